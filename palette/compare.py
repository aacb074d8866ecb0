"""Several recipes run on the same model and the same probe inputs: each one's measured output PSNR
(per sample and mean) against the unpalettized model, its size and bits per weight, and the PSNR
between every two recipes' outputs; a labelled PSNR-against-size PNG; and, for a model with a
sampling pipeline (the default model's), a grid of samples with the same prompts and seeds.

Every recipe is applied reversibly (`palettized`), so the model is left as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .metrics import image_psnr
from .palettize import palettized
from .plot import plot_recipes, row_label, write_grid
from .probe.measure import Measurement, outputs, palettized_outputs, probe_set_of
from .recipe import PaletteSpec, Recipe, SpecMapping, as_recipe

Plan = Recipe | PaletteSpec | SpecMapping
Pipeline = Callable[..., np.ndarray]  # (prompts, steps=, seed=) -> uint8 images NHWC


@dataclass(frozen=True)
class RecipeResult:
    """One recipe measured on the comparison's probe inputs (PSNR in dB against the 16-bit model)."""

    label: str
    size_bytes: int
    bits_per_weight: float
    predicted_psnr: float | None
    psnr: float  # mean over samples (Apple's definition)
    per_sample_psnr: tuple[float, ...]
    mse: float
    cosine: float

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class Comparison:
    """Recipes measured on one probe set. `pairwise[a][b]`: PSNR of recipe a's outputs with recipe b's
    as the reference (Apple's PSNR takes the reference's peak, so it is not quite symmetric)."""

    results: tuple[RecipeResult, ...]
    pairwise: dict[str, dict[str, float]]
    inputs: str  # the probe set's description
    size_16bit_bytes: int
    model: str
    recipes: tuple[Recipe, ...] = field(repr=False, compare=False, default=())

    def __getitem__(self, label: str) -> RecipeResult:
        for r in self.results:
            if r.label == label:
                return r
        raise KeyError(f"no recipe labelled {label!r}; have {[r.label for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "inputs": self.inputs, "size_16bit_bytes": self.size_16bit_bytes,
                "recipes": [r.to_dict() for r in self.results], "pairwise_psnr": self.pairwise}

    def __str__(self) -> str:
        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        width = max(24, *(len(r.label) + 2 for r in self.results))
        rows = [f"{self.model}; PSNR in dB against the 16-bit model on {self.inputs}",
                f"{'recipe':<{width}} {'bits/w':>6} {'size MB':>8} {'predicted':>9} {'measured':>9} "
                f"{'min':>7} {'max':>7}",
                f"{'16-bit':<{width}} {16.0:>6.2f} {self.size_16bit_bytes / 1e6:>8.3f} {'-':>9} {'-':>9} "
                f"{'-':>7} {'-':>7}"]
        for r in self.results:
            rows.append(f"{r.label:<{width}} {r.bits_per_weight:>6.2f} {r.size_bytes / 1e6:>8.3f} "
                        f"{f(r.predicted_psnr):>9} {r.psnr:>9.2f} {min(r.per_sample_psnr):>7.2f} "
                        f"{max(r.per_sample_psnr):>7.2f}")
        if len(self.results) > 1:
            rows.append("PSNR between recipes' outputs (row's against the column's):")
            labels = [r.label for r in self.results]
            rows.append(f"{'':<{width}} " + " ".join(f"{i + 1:>8}" for i in range(len(labels))))
            for i, a in enumerate(labels):
                cells = ["-" if a == b else f"{self.pairwise[a][b]:.2f}" for b in labels]
                rows.append(f"{f'{i + 1} {a}':<{width}} " + " ".join(f"{c:>8}" for c in cells))
        return "\n".join(rows)

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG of measured PSNR against size, every recipe labelled (per-sample range as a bar)."""
        points = [(r.label, r.size_bytes, r.psnr, min(r.per_sample_psnr), max(r.per_sample_psnr))
                  for r in self.results]
        return plot_recipes(path, points, self.size_16bit_bytes, f"{self.model}: recipes compared")

    def sample_grid(self, path: str | os.PathLike, model: nn.Module, pipeline: Pipeline, prompts: Sequence[str],
                    *, steps: int = 20, seed: int = 0) -> dict[str, float]:
        """Sample `prompts` with the same `seed` at 16 bits and with every recipe (`pipeline` runs
        `model`), write the grid (one row each) to `path`, and return each recipe's image PSNR
        (dB, peak 255) against the 16-bit samples."""
        if not self.recipes:
            raise ValueError("this comparison holds no recipes to sample with")
        images = sample_images(model, pipeline, [None, *self.recipes], prompts, steps=steps, seed=seed)
        scores = {r.label: image_psnr(imgs, images[0]) for r, imgs in zip(self.results, images[1:])}
        rows = [(row_label("16-bit", self.size_16bit_bytes, 16.0), images[0])]
        rows += [(row_label(r.label, r.size_bytes, r.bits_per_weight, r.psnr) + f"\nimages {scores[r.label]:.1f} dB",
                  imgs) for r, imgs in zip(self.results, images[1:])]
        write_grid(path, rows, prompts, f"{self.model}: same prompts, seed {seed}, {steps} steps")
        return scores


def sample_images(model: nn.Module, pipeline: Pipeline, plans: Sequence[Plan | None], prompts: Sequence[str],
                  *, steps: int = 20, seed: int = 0) -> list[np.ndarray]:
    """`pipeline(prompts, steps=, seed=)` once per plan (None: the model as it is), each plan
    applied reversibly to `model`, the model that `pipeline` runs: same prompts, same seed."""
    images = []
    for plan in plans:
        palettes = {} if plan is None else as_recipe(model, plan, seed=seed).palettes(model)
        with palettized(model, palettes):
            images.append(pipeline(list(prompts), steps=steps, seed=seed))
    return images


def compare_recipes(
    model: nn.Module,
    recipes: Mapping[str, Plan] | Sequence[Plan],
    inputs: Any = None,
    *,
    seed: int = 0,
    n_samples: int = 8,
) -> Comparison:
    """Run every recipe on the same probe inputs (`inputs`: a ProbeSet, user inputs, or None for
    `n_samples` data-free ones with `seed`, as `measure` builds them) and compare: per recipe the
    measured output PSNR (per sample and mean), size, bits per weight; between every two recipes
    the PSNR of their outputs. `recipes`: {label: plan}, or plans labelled `recipe 1`, `recipe 2`...
    Each recipe is checked against the model first; the model is left unchanged."""
    labelled = dict(recipes) if isinstance(recipes, Mapping) else {
        f"recipe {i + 1}": r for i, r in enumerate(recipes)}
    if not labelled:
        raise ValueError("compare_recipes needs at least one recipe")
    plans = {label: as_recipe(model, plan, seed=seed) for label, plan in labelled.items()}
    for plan in plans.values():
        plan.check(model)
    probe = probe_set_of(model, inputs, seed, n_samples)
    refs = outputs(model, probe)
    outs = {label: palettized_outputs(model, plan, probe, seed=seed) for label, plan in plans.items()}
    results = []
    for label, plan in plans.items():
        m = Measurement.of(outs[label], refs, probe.description)
        results.append(RecipeResult(label, plan.size_bytes, plan.bits_per_weight, plan.predicted_psnr, m.psnr,
                                    m.per_sample_psnr, m.mse, m.cosine))
    pairwise = {a: {b: Measurement.of(outs[a], outs[b], probe.description).psnr for b in plans if b != a}
                for a in plans}
    full = next(iter(plans.values())).size_16bit_bytes
    return Comparison(tuple(results), pairwise, probe.description, full, type(model).__name__,
                      tuple(plans.values()))


__all__ = ["Comparison", "RecipeResult", "compare_recipes", "sample_images"]
