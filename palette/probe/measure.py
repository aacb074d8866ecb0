"""Measure what a recipe really does to a model's output on a probe set, leaving the model unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..cluster import Palette
from ..metrics import psnr_from_mse
from ..palettize import palettized_per_call, untouched
from ..recipe import PaletteSpec, Recipe, SpecMapping, as_recipe
from .inputs import ProbeSet, make_probe_set


@dataclass(frozen=True)
class Measurement:
    """Output error of a palettized model against the original on the probe inputs."""

    psnr: float  # Apple's latent PSNR, dB: per sample, averaged
    mse: float
    cosine: float
    description: str
    per_sample_psnr: tuple[float, ...] = ()

    @classmethod
    def of(cls, outs: list[torch.Tensor], refs: list[torch.Tensor], description: str) -> "Measurement":
        """Compare outputs with reference outputs, unit by unit (sample = first dimension)."""
        x = torch.cat([o.double().reshape(o.shape[0], -1) for o in outs])
        r = torch.cat([o.double().reshape(o.shape[0], -1) for o in refs])
        per_sample = ((x - r) ** 2).mean(1).cpu().numpy()
        psnrs = psnr_from_mse(per_sample, r.abs().amax(1).cpu().numpy())
        cos = float(torch.nn.functional.cosine_similarity(x, r, dim=1, eps=1e-12).mean())
        return cls(float(psnrs.mean()), float(np.mean(per_sample)), cos, description, tuple(float(p) for p in psnrs))


@torch.no_grad()
def outputs(model: nn.Module, probe: ProbeSet) -> list[torch.Tensor]:
    """The model's main output for every unit of the probe set, as it is now (in eval mode; every
    flag and buffer restored)."""
    with untouched(model):
        return [unit(model).detach().clone() for unit in probe.units]


def per_sample_mse(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> np.ndarray:
    """Per-sample MSE of outputs against reference outputs, unit by unit."""
    return torch.cat([((y.double() - r.double()) ** 2).reshape(r.shape[0], -1).mean(1)
                      for y, r in zip(outs, refs)]).cpu().numpy()


def probe_set_of(model: nn.Module, inputs: Any, seed: int, n_samples: int) -> ProbeSet:
    """`inputs` as a probe set: as it is if it is one, else built (`make_probe_set`)."""
    return inputs if isinstance(inputs, ProbeSet) else make_probe_set(model, inputs, seed=seed, n_samples=n_samples)


def measure(
    model: nn.Module,
    plan: Recipe | PaletteSpec | SpecMapping,
    inputs: Any = None,
    *,
    seed: int = 0,
    n_samples: int = 8,
    refs: list[torch.Tensor] | None = None,
) -> Measurement:
    """Palettize `plan` (a Recipe, or a spec or mapping: `Recipe.from_specs`), run the probe set
    (`inputs`: a ProbeSet, user inputs, or None to synthesise `n_samples` with `seed`), compare with
    the original outputs (`refs` if already computed), and restore the model, whatever happens."""
    with untouched(model):
        probe = probe_set_of(model, inputs, seed, n_samples)
        outs = palettized_outputs(model, plan, probe, seed=seed)
        refs = outputs(model, probe) if refs is None else refs
    return Measurement.of(outs, refs, probe.description)


def palettized_outputs(
    model: nn.Module, plan: Recipe | PaletteSpec | SpecMapping, probe: ProbeSet, *, seed: int = 0
) -> list[torch.Tensor]:
    """The model's outputs on `probe` with `plan` applied (fitted first; each layer palettized
    only while it runs, so no copy of the weights is made), run in eval mode; the model restored
    after, whatever happens."""
    return outputs_with(model, as_recipe(model, plan, seed=seed).palettes(model), probe)


def outputs_with(model: nn.Module, palettes: Mapping[str, Palette], probe: ProbeSet) -> list[torch.Tensor]:
    """The model's outputs on `probe` computed with already fitted `palettes` (`palettized_per_call`);
    the model restored after, whatever happens."""
    with untouched(model), palettized_per_call(model, palettes):
        return outputs(model, probe)
