"""The embedded default model: a small text-conditioned diffusers UNet trained here on procedural
captioned scenes, conditioned on the pretrained all-MiniLM-L6-v2 (see ``default.py``)."""

from palette.models.default import (
    DefaultPipeline,
    default_probe_inputs,
    encode_prompts,
    generate,
    load_default,
)
from palette.models.minilm import load_minilm

__all__ = ["DefaultPipeline", "default_probe_inputs", "encode_prompts", "generate", "load_default", "load_minilm"]
