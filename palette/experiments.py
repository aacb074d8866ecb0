"""Measured experiments shared by the demo, the CLI's `allocate` plot and the benchmarks: the
output PSNR against model size of uniform k-means, linear 8-bit and palette's mixed bits.

Every point is measured on the probe set (palettize, run, compare with the original outputs,
restore), so the model is left unchanged. Sizes are the whole model as stored (`Recipe.size_bytes`:
palettized weights with their LUTs, everything else at 16 bits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .allocate import allocate, allocate_bits
from .cluster import Palette
from .palettize import palettized
from .pipeline import PipelineRecipe
from .probe import Measurement, ProbeSet, Sensitivity, measure
from .probe.measure import outputs
from .recipe import Recipe, fixed_bytes
from .spec import NBITS, PaletteSpec


@dataclass
class Curve:
    """Measured PSNR (dB) against whole-model size (bytes) of one model's variants."""

    title: str
    full_bytes: int  # the model at 16 bits
    uniform: list[tuple[int, float, int]]  # (size, psnr, nbits) of uniform per-tensor k-means
    int8: tuple[int, float]  # (size, psnr) of symmetric per-channel linear 8-bit
    mixed: list[tuple[int, float, float | None]]  # (size, measured, predicted) of palette's recipes


def linear8_palette(weight: torch.Tensor) -> Palette:
    """Symmetric per-output-channel int8 (scale = max|w| / 127 in fp16, codes -127..127) written
    as the palette it is: a 256-entry LUT of the integers -128..127 with a per-channel scale, so
    that it is applied and measured exactly like any palette."""
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


def psnr_size_curve(
    model: nn.Module,
    sensitivity: Sensitivity,
    probe: ProbeSet,
    bits: Sequence[float] = (2, 2.5, 3, 3.5, 4, 5, 6),
    seed: int = 0,
) -> Curve:
    """Measure, on `probe`, uniform per-tensor k-means at 1/2/3/4/6/8 bits, linear 8-bit, and
    palette's mixed-bit recipes allocated from `sensitivity` at each `bits` budget (with their
    predicted PSNR) over the probed layers."""
    names = list(sensitivity.layers)
    refs = outputs(model, probe)
    uniform = []
    for b in NBITS:
        recipe = Recipe.from_specs(model, {n: PaletteSpec(b) for n in names}, seed=seed)
        uniform.append((recipe.size_bytes, measure(model, recipe, probe, refs=refs).psnr, b))
    modules = dict(model.named_modules())
    with palettized(model, {n: linear8_palette(modules[n].weight) for n in names}):
        int8 = (linear8_bytes(model, names), Measurement.of(outputs(model, probe), refs, probe.description).psnr)
    mixed = []
    for b in bits:
        recipe = allocate_bits(model, budget_bits=b, sensitivity=sensitivity, seed=seed, progress=False)
        mixed.append((recipe.size_bytes, measure(model, recipe, probe, refs=refs).psnr, recipe.predicted_psnr))
    full = Recipe.from_specs(model, {}).size_bytes
    return Curve(f"{type(model).__name__}: PSNR vs. size", full, uniform, int8, mixed)


def split_allocation(
    sensitivities: dict[str, Sensitivity], bases: dict[str, Recipe], budget_bytes: int, fraction: float,
    first: str = "text_encoder",
) -> PipelineRecipe:
    """Per-component allocation, the way one would without a joint probe: every component allocated
    on its own output (`sensitivities`, its dense recipe in `bases`), the room for palettized
    weights (the budget less every component's other parameters) split two ways, `fraction` of it
    to component `first`, held within what each component can reach."""
    second = next(n for n in bases if n != first)
    smallest = {n: b.fixed_bytes + sum(min(x for x in sensitivities[n].nbytes[k] if x is not None) for k in b.layers)
                for n, b in bases.items()}
    room = budget_bytes - sum(b.fixed_bytes for b in bases.values())
    share = min(max(bases[first].fixed_bytes + int(fraction * room), smallest[first]), budget_bytes - smallest[second])
    return PipelineRecipe({first: allocate(sensitivities[first], bases[first], share / 1e9),
                           second: allocate(sensitivities[second], bases[second], (budget_bytes - share) / 1e9)})


def proportional_fraction(bases: dict[str, Recipe], first: str = "text_encoder") -> float:
    """The share of component `first` in the target weights: the same bits per weight everywhere."""
    numel = {n: sum(math.prod(s) for s in b.shapes.values()) for n, b in bases.items()}
    return numel[first] / sum(numel.values())


def feasible_fractions(sensitivities: dict[str, Sensitivity], bases: dict[str, Recipe], budget_bytes: int, n: int,
                       first: str = "text_encoder") -> list[float]:
    """`n` fractions evenly inside the range each component can reach at this budget."""
    second = next(k for k in bases if k != first)
    low = {k: sum(min(x for x in sensitivities[k].nbytes[name] if x is not None) for name in b.layers)
           for k, b in bases.items()}
    room = budget_bytes - sum(b.fixed_bytes for b in bases.values())
    lo, hi = low[first] / room, 1 - low[second] / room
    return [float(f) for f in np.linspace(lo + 0.02 * (hi - lo), hi - 0.02 * (hi - lo), n)]
