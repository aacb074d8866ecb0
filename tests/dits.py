"""Tiny random diffusion transformers shared by the DiT tests (test_dit_inputs, test_ane_dit,
test_dit_allocate): one of each class palette synthesises probe inputs for, from `palette.models.zoo`."""

from __future__ import annotations

import functools
import re

import diffusers
import torch
from torch import nn

from palette.models.zoo import build, config

# diffusers class -> the zoo's tiny architecture of that class
CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux-dev",
           "PixArtTransformer2DModel": "pixart-sigma", "SanaTransformer2DModel": "sana"}
# FLUX's config has no sample size and its pipeline's default 128^2 latent is 4096 tokens: slow for a
# test; the other classes' tiny configs carry a small `sample_size`
LATENT = {"flux": 8, "flux-dev": 8, "flux-schnell": 8}


def tiny(name: str, **overrides: object) -> nn.Module:
    """A new tiny `name` (the zoo's seeded weights); with `overrides`, its config changed and the
    qk-norm weights made non-trivial (N(1, 0.3): reversing them changes the attention)."""
    if not overrides:
        return build(name, tiny=True)
    cls, cfg = config(name, tiny=True)
    torch.manual_seed(0)
    model = getattr(diffusers, cls)(**cfg, **overrides).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if re.search(r"\.norm_(added_)?[qk]\.", param_name):
                p.normal_(1.0, 0.3)
    return model


@functools.cache
def shared_tiny(name: str) -> nn.Module:
    """The tiny `name`, built once per test session: for tests that only run it, never change it."""
    return tiny(name)
