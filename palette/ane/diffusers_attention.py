"""Split-einsum attention processor for diffusers `Attention` modules (UNet self/cross-attention).

The processor runs the attention in (B, C, 1, S): the projections `to_q`, `to_k`, `to_v` and
`to_out.0` are `Conv1x1` modules under their original names. The surrounding transformer block
works in (B, S, C), so the processor transposes once on the way in (per input) and once on the way
out; (B, C, H, W) inputs (attention in VAE/mid blocks) need no transpose at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from palette.ane.attention import mask_to_ane, split_einsum_attention
from palette.ane.conv import Conv1x1

_UNSUPPORTED = ("spatial_norm", "norm_q", "norm_k", "added_kv_proj_dim")


@dataclass
class SplitEinsumProcessor:
    """diffusers attention processor computing split-einsum attention (chunk_size: v2 if set)."""

    chunk_size: int | None = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        image_shape = hidden_states.shape if hidden_states.dim() == 4 else None
        x = _to_ane(hidden_states)
        if attn.group_norm is not None:
            x = attn.group_norm(x)
        if encoder_hidden_states is None:
            context = x
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            context = _to_ane(encoder_hidden_states)
        out = split_einsum_attention(
            attn.to_q(x),
            attn.to_k(context),
            attn.to_v(context),
            heads=attn.heads,
            scale=attn.scale,
            mask=mask_to_ane(attention_mask, x.dtype),
            chunk_size=self.chunk_size,
        )
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.reshape(image_shape) if image_shape is not None else out.squeeze(2).transpose(1, 2)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _to_ane(x: torch.Tensor) -> torch.Tensor:
    """(B, S, C) -> (B, C, 1, S); (B, C, H, W) -> (B, C, 1, H*W)."""
    if x.dim() == 4:
        return x.flatten(2).unsqueeze(2)
    return x.transpose(1, 2).unsqueeze(2)


@dataclass
class DiffusersUndo:
    """What `rewrite_diffusers_attention` changed on one Attention module, to put it back."""

    attn: Attention
    processor: object
    linears: dict[str, nn.Linear]

    def restore(self) -> None:
        for name, linear in self.linears.items():
            conv = self.attn.to_out[0] if name == "to_out.0" else getattr(self.attn, name)
            _set(self.attn, name, conv.to_linear(linear))
        self.attn.set_processor(self.processor)


def rewrite_diffusers_attention(attn: Attention, chunk_size: int | None) -> DiffusersUndo:
    """Swap one Attention's projections for Conv1x1 and its processor for SplitEinsumProcessor."""
    for feature in _UNSUPPORTED:
        if getattr(attn, feature, None) is not None:
            raise NotImplementedError(f"split_einsum: diffusers Attention with {feature} is not supported")
    names = ("to_q", "to_k", "to_v", "to_out.0")
    linears = {name: attn.to_out[0] if name == "to_out.0" else getattr(attn, name) for name in names}
    for name, linear in linears.items():
        if type(linear) is not nn.Linear:
            raise NotImplementedError(f"split_einsum: {name} is a {type(linear).__name__}, not nn.Linear")
    undo = DiffusersUndo(attn, attn.get_processor(), linears)
    for name, linear in linears.items():
        _set(attn, name, Conv1x1(linear))
    attn.set_processor(SplitEinsumProcessor(chunk_size))
    return undo


def _set(attn: Attention, name: str, module: nn.Module) -> None:
    if name == "to_out.0":
        attn.to_out[0] = module
    else:
        setattr(attn, name, module)
