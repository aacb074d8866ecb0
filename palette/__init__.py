"""palette: data-free mixed-bit k-means palettization of diffusion models for Core ML."""

__version__ = "0.1.0"
