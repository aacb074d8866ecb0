"""Denoiser architectures by name, built from their diffusers configs with random weights.

`build(name)` gives the full-size architecture (for time and memory measurements: weights are
random, fan-in scaled, so nothing here is a trained model); `build(name, tiny=True)` a tiny config
of the same class that runs in a fraction of a second (for tests). No weights are downloaded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

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
    "sd3": (
        "SD3Transformer2DModel",
        {},  # filled from the public configs (see FULL_CONFIG_SOURCES)
        dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
             out_channels=4, pos_embed_max_size=16),
    ),
    "flux": (
        "FluxTransformer2DModel",
        {},
        dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
             num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
             axes_dims_rope=(8, 12, 12)),
    ),
    "pixart": (
        "PixArtTransformer2DModel",
        {},
        dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
             cross_attention_dim=64, sample_size=8, patch_size=2, caption_channels=48, norm_num_groups=8,
             use_additional_conditions=False),
    ),
    "sana": (
        "SanaTransformer2DModel",
        {},
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
             num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
             caption_channels=48, sample_size=8, patch_size=1),
    ),
}


def config(name: str, tiny: bool = False) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, config) of architecture `name`."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    cls, full, small = ARCHITECTURES[name]
    if not tiny and not full:
        raise ValueError(f"{name}: no full-size config recorded")
    return cls, dict(small if tiny else full)


def build(name: str, tiny: bool = False, seed: int = 0, device: str | torch.device | None = None) -> nn.Module:
    """The architecture `name` with seeded random weights (every Linear/Conv weight N(0, 1/fan_in)),
    in eval mode; the global RNG state is left as it was."""
    import diffusers

    cls_name, cfg = config(name, tiny)
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
