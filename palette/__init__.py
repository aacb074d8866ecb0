"""palette: data-free mixed-bit k-means palettization of diffusion models for Core ML.

Pipeline: cluster (one tensor -> Palette) -> palettize (apply to layers) -> probe (sensitivity)
-> allocate (bits under a size budget) -> recipe (JSON) -> export (Core ML, safetensors).
"""

from .cluster import Palette, fit_palette, fit_palettes, fit_palettes_batch, optimal_costs
from .palettize import apply_palettes, keep_original, palettize, resolve_specs, target_layers
from .spec import NBITS, PaletteSpec

__version__ = "0.1.0"

__all__ = [
    "NBITS",
    "Palette",
    "PaletteSpec",
    "apply_palettes",
    "fit_palette",
    "fit_palettes",
    "fit_palettes_batch",
    "keep_original",
    "optimal_costs",
    "palettize",
    "resolve_specs",
    "target_layers",
]
