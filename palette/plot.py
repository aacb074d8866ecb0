"""PSNR against model size, like the figure of Apple's mixed-bit palettization pre-analysis.

Every point is measured (`palette.measure`: palettize, run the probe inputs, compare with the
original outputs, restore), so the model is left unchanged. Sizes are the whole model as stored
(`Recipe.size_bytes`: palettized weights with their LUTs, everything else at 16 bits).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocate import allocate_bits
from .cluster import Palette
from .measure import measure
from .recipe import fixed_bytes, from_mapping
from .spec import PaletteSpec

UNIFORM_NBITS = (1, 2, 3, 4, 6, 8)
MB = 1e6


def linear8_palette(weight: torch.Tensor) -> Palette:
    """Symmetric per-output-channel int8 (scale = max|w| / 127 in fp16, codes -127..127) written
    as the palette it is: a 256-entry LUT of the integers -128..127 with a per-channel scale, so
    that `measure` applies it exactly like any palette."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    amax = w.abs().amax(1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).half()
    q = torch.clamp(torch.round(w / scale.float()[:, None]), -127, 127)
    lut = torch.arange(-128, 128, dtype=torch.float16).reshape(1, 256, 1)
    indices = (q + 128).to(torch.uint8).reshape(weight.shape)
    return Palette(lut, indices, PaletteSpec(8, per_channel_scale=True), scale)


def linear8_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Whole model with `names` in int8 (1 byte a weight, one fp16 scale per output channel)."""
    modules = dict(model.named_modules())
    targets = {n: modules[n] for n in names}
    return fixed_bytes(model, targets) + sum(m.weight.numel() + 2 * m.weight.shape[0] for m in targets.values())


def plot_psnr_vs_size(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    sensitivity: Any,
    inputs: Any = None,
    bits: Sequence[float] = (2, 2.5, 3, 3.5, 4, 5, 6),
    seed: int = 0,
    extra: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    **probe_kwargs: Any,
) -> Path:
    """Write a PNG of measured PSNR (dB) against whole-model size (MB): uniform per-tensor k-means
    at 1/2/3/4/6/8 bits, a linear 8-bit baseline, and palette's mixed-bit recipes allocated from
    `sensitivity` at each `bits` budget (measured, and predicted dashed). `extra` adds measured
    series {label: [(size_bytes, psnr)]}, e.g. another method's recipes. Measurement uses
    `inputs` (or probe inputs synthesised with `seed` and `probe_kwargs`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def psnr(mapping: Mapping[str, Any]) -> float:
        return measure(model, mapping, inputs, seed=seed, **probe_kwargs).psnr

    names = list(sensitivity.layers)
    uniform = []
    for b in UNIFORM_NBITS:
        mapping = {n: PaletteSpec(b) for n in names}
        uniform.append((from_mapping(model, mapping).size_bytes, psnr(mapping)))
    modules = dict(model.named_modules())
    int8 = (linear8_bytes(model, names), psnr({n: linear8_palette(modules[n].weight) for n in names}))
    mixed = []
    for b in bits:
        recipe = allocate_bits(model, budget_bits=b, sensitivity=sensitivity, seed=seed, progress=False)
        mixed.append((recipe.size_bytes, psnr(recipe.palettes(model)), recipe.predicted_psnr))
    full = from_mapping(model, {}).size_bytes

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.plot([s / MB for s, _ in uniform], [p for _, p in uniform], "o-", color="tab:gray",
            label="uniform k-means, per tensor")
    for (s, p), b in zip(uniform, UNIFORM_NBITS):
        ax.annotate(f"{b}b", (s / MB, p), textcoords="offset points", xytext=(4, -10), fontsize=8, color="tab:gray")
    ax.plot(int8[0] / MB, int8[1], "bx", markersize=9, label="linear 8-bit (symmetric, per channel)")
    ax.axhline(int8[1], color="b", ls=":", lw=0.8)
    ax.plot([s / MB for s, _, _ in mixed], [p for _, p, _ in mixed], "o-", color="tab:red",
            label="palette mixed-bit (measured)")
    ax.plot([s / MB for s, _, _ in mixed], [q for _, _, q in mixed], "--", color="tab:red", alpha=0.6,
            label="palette mixed-bit (predicted)")
    for label, pts in (extra or {}).items():
        pts = sorted(pts)
        ax.plot([s / MB for s, _ in pts], [p for _, p in pts], "s-", ms=4, label=label)
    ax.axvline(full / MB, color="k", ls=":", lw=0.8)
    ax.annotate("16-bit", (full / MB, ax.get_ylim()[0]), textcoords="offset points", xytext=(-34, 4), fontsize=8)
    ax.set_xlabel("model size as stored (MB)")
    ax.set_ylabel("output PSNR vs. original (dB)")
    ax.set_title(f"{type(model).__name__}: PSNR vs. size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
