"""Export: Core ML mlpackages with palette's exact LUTs (from torch, or applied to an existing
fp16 package), palettes as safetensors, read-back verification of both, and chunking of a program
into pieces under a per-file size limit."""

from ..chunking import chunks_needed, layer_bytes_in_order
from .chunk import ChunkedExportReport, ChunkManifest, chunk_mlpackage, verify_chunks
from .coreml import export_coreml
from .mlpackage import palettize_mlpackage
from .safetensors_io import export_palettes, load_palettes
from .verify import ExportReport, LayerBytes, VerificationError, verify_mlpackage

__all__ = [
    "ChunkManifest",
    "ChunkedExportReport",
    "ExportReport",
    "LayerBytes",
    "VerificationError",
    "chunk_mlpackage",
    "chunks_needed",
    "export_coreml",
    "export_palettes",
    "layer_bytes_in_order",
    "load_palettes",
    "palettize_mlpackage",
    "verify_chunks",
    "verify_mlpackage",
]
