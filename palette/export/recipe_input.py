"""Normalise what the exporters accept as a recipe into fitted palettes, checked for consistency.

A recipe may be a `Recipe` (anything with a `.layers` mapping), a plain mapping of layer name to
`PaletteSpec` or None (None keeps that layer at 16 bits), a single `PaletteSpec` for every target
layer, pre-fitted palettes `{name: Palette}`, or None (nothing palettized). Specs are fitted here
without touching the model; pre-fitted palettes are used as they are, never clustered again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..cluster import Palette, fit_palette
from ..palettize import resolve_specs
from ..spec import PaletteSpec

RecipeLike = Any  # Recipe | Mapping[str, PaletteSpec | None] | Mapping[str, Palette] | PaletteSpec | None


def check_palette(pal: Palette, name: str, weight_shape: tuple[int, ...] | None = None) -> None:
    """Raise ValueError if `pal` is not a well-formed palette (of a weight of `weight_shape`)."""
    if not isinstance(pal, Palette):
        raise ValueError(f"{name}: expected a Palette, got {type(pal).__name__}")
    spec = pal.spec
    shape = pal.shape
    if weight_shape is not None and (
        shape[0] != weight_shape[0] or math.prod(shape) != math.prod(weight_shape)
    ):
        raise ValueError(f"{name}: palette shape {shape} does not fit weight shape {weight_shape}")
    groups = spec.n_groups(shape[0], name)
    want_lut = (groups, spec.n_entries, spec.cluster_dim)
    if pal.lut.dtype != torch.float16 or tuple(pal.lut.shape) != want_lut:
        raise ValueError(
            f"{name}: LUT must be float16 of shape {want_lut}, got {pal.lut.dtype} {tuple(pal.lut.shape)}"
        )
    if pal.indices.dtype != torch.uint8:
        raise ValueError(f"{name}: indices must be uint8, got {pal.indices.dtype}")
    if pal.indices.numel() and int(pal.indices.max()) >= spec.n_entries:
        raise ValueError(f"{name}: an index exceeds the {spec.n_entries}-entry LUT")
    if not bool(torch.isfinite(pal.lut).all()):
        raise ValueError(f"{name}: LUT has NaN/Inf entries")
    if spec.per_channel_scale:
        if pal.scale is None or pal.scale.dtype != torch.float16 or tuple(pal.scale.shape) != (shape[0],):
            raise ValueError(f"{name}: per_channel_scale needs a float16 scale of shape ({shape[0]},)")
    elif pal.scale is not None:
        raise ValueError(f"{name}: has a scale but its spec says per_channel_scale=False")


def recipe_palettes(model: nn.Module, recipe: RecipeLike, *, seed: int = 0) -> dict[str, Palette]:
    """{layer name: Palette} for the layers `recipe` palettizes, in module order."""
    if recipe is None:
        return {}
    if hasattr(recipe, "palettes"):  # a Recipe: its own palettes, stored LUTs included
        return recipe.palettes(model)
    layers = getattr(recipe, "layers", recipe)
    modules = dict(model.named_modules())
    fitted = {n: v for n, v in layers.items() if v is not None} if isinstance(layers, Mapping) else {}
    if fitted and all(isinstance(v, Palette) for v in fitted.values()):  # None entries stay fp16
        layers = fitted
        unknown = [n for n in layers if not isinstance(getattr(modules.get(n), "weight", None), torch.Tensor)]
        if unknown:
            raise ValueError(f"palettes name layers the model does not have (or without a weight): {unknown[:10]}")
        for n, pal in layers.items():
            check_palette(pal, n, tuple(modules[n].weight.shape))
        return {n: layers[n] for n in modules if n in layers}
    if not isinstance(layers, (PaletteSpec, Mapping)):
        raise ValueError(
            "recipe must be a Recipe, a PaletteSpec, a mapping {layer: PaletteSpec | None} or "
            f"fitted palettes {{layer: Palette}}; got {type(recipe).__name__}"
        )
    specs = resolve_specs(model, layers)
    for n, spec in specs.items():  # every layer checked before any k-means runs
        spec.n_groups(modules[n].weight.shape[0], n)
    return {
        n: fit_palette(modules[n].weight, spec, seed=seed, name=n) for n, spec in specs.items()
    }
