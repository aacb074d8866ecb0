"""Denoiser architectures by name, built from their diffusers configs with random weights.

`build(name)` gives the full-size architecture (for time and memory measurements: weights are
random, fan-in scaled, so nothing here is a trained model); `build(name, tiny=True)` a tiny config
of the same class that runs in a fraction of a second (for tests). No weights are downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Full-size transformer configs: the architecture of each model's hub `transformer/config.json`
# (where each came from: FULL_CONFIG_SOURCES); keys left out take diffusers' defaults.
_SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
_SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                   num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
_FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
_PIXART_SIGMA = dict(sample_size=128, num_layers=28, attention_head_dim=72, in_channels=4, out_channels=8,
                     patch_size=2, attention_bias=True, num_attention_heads=16, cross_attention_dim=1152,
                     activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                     norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096, interpolation_scale=2,
                     use_additional_conditions=False)
_SANA_COMMON = dict(in_channels=32, out_channels=32, caption_channels=2304, mlp_ratio=2.5, attention_bias=False,
                    sample_size=32, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
                    interpolation_scale=None)
_SANA_600M = dict(_SANA_COMMON, num_attention_heads=36, attention_head_dim=32, num_layers=28,
                  num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152)
_SANA_1600M = dict(_SANA_COMMON, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                   num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240)

_SD3_TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
                 out_channels=4, pos_embed_max_size=16)
_FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(8, 12, 12))
_PIXART_TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
                    cross_attention_dim=64, sample_size=8, patch_size=2, caption_channels=48, norm_num_groups=8,
                    use_additional_conditions=False)
_SANA_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                  num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                  caption_channels=48, sample_size=8, patch_size=1)


# name -> (diffusers class name, full-size config, tiny config)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "sd15-unet": (
        "UNet2DConditionModel",
        dict(cross_attention_dim=768, sample_size=64),
        dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
    ),
    "sdxl-unet": (
        "UNet2DConditionModel",
        dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816),
        dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
             cross_attention_dim=64, attention_head_dim=(4, 8), norm_num_groups=8, use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
    ),
    "sd3": ("SD3Transformer2DModel", _SD3_MEDIUM, _SD3_TINY),
    "sd35-large": ("SD3Transformer2DModel", _SD35_LARGE, {**_SD3_TINY, "qk_norm": "rms_norm"}),
    "flux": ("FluxTransformer2DModel", _FLUX_DEV, _FLUX_TINY),  # same as flux-dev
    "flux-dev": ("FluxTransformer2DModel", _FLUX_DEV, _FLUX_TINY),
    "flux-schnell": ("FluxTransformer2DModel", {**_FLUX_DEV, "guidance_embeds": False},
                     {**_FLUX_TINY, "guidance_embeds": False}),
    "pixart": ("PixArtTransformer2DModel", _PIXART_SIGMA, _PIXART_TINY),  # same as pixart-sigma
    "pixart-sigma": ("PixArtTransformer2DModel", _PIXART_SIGMA, _PIXART_TINY),
    "sana": ("SanaTransformer2DModel", _SANA_1600M, _SANA_TINY),  # same as sana-1600m
    "sana-600m": ("SanaTransformer2DModel", _SANA_600M, _SANA_TINY),
    "sana-1600m": ("SanaTransformer2DModel", _SANA_1600M, _SANA_TINY),
}


@dataclass(frozen=True)
class ConfigSource:
    """Where a full-size config comes from: the hub pipeline and component it describes, the public
    text its values were taken from, and the component's published parameter count."""

    model_id: str
    subfolder: str
    source: str
    published_params: float


_HUB_QUOTE = "its config.json as quoted in public code (search index)"
FULL_CONFIG_SOURCES: dict[str, ConfigSource] = {
    "sd15-unet": ConfigSource("stable-diffusion-v1-5/stable-diffusion-v1-5", "unet",
                              "diffusers UNet2DConditionModel defaults = SD 1.5's unet/config.json", 0.86e9),
    "sdxl-unet": ConfigSource("stabilityai/stable-diffusion-xl-base-1.0", "unet",
                              "unet/config.json (SDXL paper: 2.6B UNet)", 2.6e9),
    "sd3": ConfigSource("stabilityai/stable-diffusion-3-medium-diffusers", "transformer",
                        f"{_HUB_QUOTE}; HF SD3 blog: 2B", 2.0e9),
    "sd35-large": ConfigSource("stabilityai/stable-diffusion-3.5-large", "transformer",
                               f"{_HUB_QUOTE}; model card: 8.1B", 8.1e9),
    "flux-dev": ConfigSource("black-forest-labs/FLUX.1-dev", "transformer",
                             f"{_HUB_QUOTE}; = FluxTransformer2DModel defaults with guidance_embeds; card: 12B", 12e9),
    "flux-schnell": ConfigSource("black-forest-labs/FLUX.1-schnell", "transformer",
                                 f"{_HUB_QUOTE}; FLUX.1-dev without the guidance embedder; card: 12B", 12e9),
    "pixart-sigma": ConfigSource("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "transformer",
                                 "diffusers scripts/convert_pixart_sigma_to_diffusers.py at 1024px, no "
                                 "micro-conditions (PixArtSigmaPipeline passes none); 0.6B", 0.6e9),
    "sana-600m": ConfigSource("Efficient-Large-Model/Sana_600M_1024px_diffusers", "transformer",
                              "diffusers scripts/convert_sana_to_diffusers.py, SanaMS_600M_P1_D28 at 1024px; "
                              "Sana paper: 0.6B", 0.6e9),
    "sana-1600m": ConfigSource("Efficient-Large-Model/Sana_1600M_1024px_diffusers", "transformer",
                               "diffusers scripts/convert_sana_to_diffusers.py, SanaMS_1600M_P1_D20 at 1024px; "
                               "Sana paper: 1.6B", 1.6e9),
}
FULL_CONFIG_SOURCES.update(flux=FULL_CONFIG_SOURCES["flux-dev"], pixart=FULL_CONFIG_SOURCES["pixart-sigma"],
                           sana=FULL_CONFIG_SOURCES["sana-1600m"])


def config(name: str, tiny: bool = False) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, config) of architecture `name`."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    cls, full, small = ARCHITECTURES[name]
    if not tiny and not full:
        raise ValueError(f"{name}: no full-size config recorded")
    return cls, dict(small if tiny else full)


def build(name: str, tiny: bool = False, seed: int = 0, device: str | torch.device | None = None,
          overrides: dict[str, Any] | None = None) -> nn.Module:
    """The architecture `name` (its config updated with `overrides`) with seeded random weights
    (every Linear/Conv weight N(0, 1/fan_in)), in eval mode; the global RNG state is left as it was."""
    import diffusers

    cls_name, cfg = config(name, tiny)
    cfg.update(overrides or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = getattr(diffusers, cls_name)(**cfg)
        with torch.no_grad():
            for m in model.modules():
                w = getattr(m, "weight", None)
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and isinstance(w, torch.Tensor):
                    w.normal_(0, math.prod(w.shape[1:]) ** -0.5)
    return model.eval()
