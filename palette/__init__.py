"""palette: data-free mixed-bit k-means palettization of diffusion models for Core ML.

Pipeline: cluster (one tensor -> Palette) -> recipe (the plan: a spec per target layer) ->
palettize (apply a recipe; the model carries its palettes) -> probe (sensitivity) -> allocate
(bits under a size budget: a recipe) -> export (Core ML, safetensors); ane (split-einsum
attention) on the side. Heavy parts (coremltools, diffusers) load on first use.
"""

from importlib import import_module
from typing import Any

from ._version import __version__
from .cluster import Palette, fit_palette, fit_palettes, fit_palettes_batch, optimal_costs
from .palettize import (
    apply_palettes,
    apply_recipe,
    keep_original,
    palettes_of,
    palettize,
    persistent_palettes,
    strip_palettes,
)
from .probe import Measurement, ProbeSet, Sensitivity, make_probe_set, measure, probe_sensitivity
from .recipe import APPLE, Candidates, Recipe, resolve_specs, target_layers
from .spec import NBITS, PaletteSpec

_LAZY = {
    "psnr": "metrics",
    "mse": "metrics",
    "cosine": "metrics",
    "spearman": "metrics",
    "allocate": "allocate",
    "diff": "recipe_diff",
    "compare_recipes": "compare",
    "allocate_bits": "allocate",
    "export_coreml": "export",
    "palettize_mlpackage": "export",
    "export_palettes": "export",
    "load_palettes": "export",
    "verify_mlpackage": "export",
    "VerificationError": "export",
    "split_einsum": "ane",
    "restore_attention": "ane",
    "validate_split_einsum": "ane",
    "load_default": "models.default",
    "generate": "models.default",
    "default_probe_inputs": "models.default",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'palette' has no attribute {name!r}")


__all__ = [
    "APPLE",
    "NBITS",
    "Candidates",
    "Measurement",
    "Palette",
    "PaletteSpec",
    "ProbeSet",
    "Recipe",
    "Sensitivity",
    "__version__",
    "apply_palettes",
    "apply_recipe",
    "fit_palette",
    "fit_palettes",
    "fit_palettes_batch",
    "keep_original",
    "make_probe_set",
    "measure",
    "optimal_costs",
    "palettes_of",
    "palettize",
    "persistent_palettes",
    "probe_sensitivity",
    "resolve_specs",
    "strip_palettes",
    "target_layers",
    *_LAZY,
]
