"""Export: Core ML mlpackages with palette's exact LUTs (from torch, or applied to an existing
fp16 package), palettes as safetensors, and read-back verification of both."""

from .coreml import export_coreml
from .mlpackage import palettize_mlpackage
from .safetensors_io import export_palettes, load_palettes
from .verify import ExportReport, LayerBytes, VerificationError, verify_mlpackage

__all__ = [
    "ExportReport",
    "LayerBytes",
    "VerificationError",
    "export_coreml",
    "export_palettes",
    "load_palettes",
    "palettize_mlpackage",
    "verify_mlpackage",
]
