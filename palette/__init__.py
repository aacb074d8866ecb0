"""palette: data-free mixed-bit k-means palettization of diffusion models for Core ML.

Pipeline: cluster (one tensor -> Palette) -> palettize (apply to layers) -> probe (sensitivity)
-> allocate (bits under a size budget) -> recipe (JSON) -> export (Core ML, safetensors);
ane (split-einsum attention) on the side. Heavy parts (coremltools, diffusers) load on first use.
"""

from importlib import import_module
from typing import Any

from .cluster import Palette, fit_palette, fit_palettes, fit_palettes_batch, optimal_costs
from .measure import Measurement, measure  # eager: the function shadows its module's name
from .palettize import (
    apply_palettes,
    keep_original,
    palettes_of,
    palettize,
    resolve_specs,
    strip_palettes,
    target_layers,
)
from .spec import NBITS, PaletteSpec

__version__ = "0.1.0"

_LAZY = {
    "probe_sensitivity": "probe",
    "Sensitivity": "probe",
    "LayerInfo": "probe",
    "make_probe_set": "probe_inputs",
    "psnr": "metrics",
    "mse": "metrics",
    "cosine": "metrics",
    "spearman": "metrics",
    "allocate_bits": "allocate",
    "Recipe": "recipe",
    "apply_recipe": "recipe",
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
    "NBITS",
    "Measurement",
    "Palette",
    "PaletteSpec",
    "apply_palettes",
    "fit_palette",
    "fit_palettes",
    "fit_palettes_batch",
    "keep_original",
    "measure",
    "optimal_costs",
    "palettes_of",
    "palettize",
    "resolve_specs",
    "strip_palettes",
    "target_layers",
    *_LAZY,
]
