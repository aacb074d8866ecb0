"""Measure what a palettization really does to a model's output, leaving the model unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .cluster import Palette
from .metrics import psnr_from_mse
from .palettize import apply_palettes, keep_original, palettize
from .probe_inputs import ProbeSet, make_probe_set
from .spec import PaletteSpec


@dataclass(frozen=True)
class Measurement:
    """Output error of a palettized model against the original on the probe inputs."""

    psnr: float  # Apple's latent PSNR, dB: per sample, averaged
    mse: float
    cosine: float
    description: str


@torch.no_grad()
def measure(
    model: nn.Module,
    mapping: Mapping[str, PaletteSpec | None] | Mapping[str, Palette],
    inputs: Any = None,
    *,
    seed: int = 0,
    n_samples: int = 8,
    **probe_kwargs: Any,
) -> Measurement:
    """Palettize `mapping` (specs, or fitted palettes), run the probe inputs, compare with the
    original outputs, and restore the palettized layers, whatever happens."""
    return measure_on(model, mapping, make_probe_set(model, inputs, seed=seed, n_samples=n_samples, **probe_kwargs), seed)


@torch.no_grad()
def measure_on(
    model: nn.Module,
    mapping: Mapping[str, PaletteSpec | None] | Mapping[str, Palette],
    probe: ProbeSet,
    seed: int = 0,
) -> Measurement:
    """`measure` on a probe set already built (`seed` seeds the clustering of specs)."""
    refs = [unit(model).detach().clone() for unit in probe.units]
    names = [n for n, s in mapping.items() if s is not None]
    with keep_original(model, names):
        if names and all(isinstance(mapping[n], Palette) for n in names):
            apply_palettes(model, {n: mapping[n] for n in names})
        elif names:
            palettize(model, {n: mapping[n] for n in names}, min_numel=0, seed=seed, progress=False)
        outs = [unit(model).detach() for unit in probe.units]
    x = torch.cat([o.double().reshape(o.shape[0], -1) for o in outs])
    r = torch.cat([o.double().reshape(o.shape[0], -1) for o in refs])
    per_sample = ((x - r) ** 2).mean(1).numpy()
    psnr = float(psnr_from_mse(per_sample, r.abs().amax(1).numpy()).mean())
    cos = float(torch.nn.functional.cosine_similarity(x, r, dim=1, eps=1e-12).mean())
    return Measurement(psnr, float(np.mean(per_sample)), cos, probe.description)
