"""Split-einsum rewrite of diffusers attention modules: projections to Conv1x1, processor swapped.

Each supported diffusers processor has a split-einsum counterpart computing the same attention in
(B, C, 1, S) (`REWRITES`); any other processor, or a feature its counterpart cannot compute, is a
`NotImplementedError` naming the module, never a silent fallback. The projections the processor
uses (`to_q`, `to_k`, `to_v`, `to_out.0`, and for joint attention `add_{q,k,v}_proj`, `to_add_out`)
become `Conv1x1` modules under their original names; `DiffusersUndo` puts everything back.

`SplitEinsumProcessor` covers the classic processors (UNet self/cross-attention, PixArt, SANA
cross-attention): the surrounding block works in (B, S, C), so it transposes once on the way in
(per input) and once on the way out; (B, C, H, W) inputs (attention in VAE/mid blocks) need no
transpose at all. The diffusion-transformer processors are in `dit_attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    JointAttnProcessor2_0,
    SanaLinearAttnProcessor2_0,
)
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

from palette.ane.attention import from_ane, mask_to_ane, split_einsum_attention, to_ane
from palette.ane.conv import Conv1x1
from palette.ane.dit_attention import (
    SplitEinsumFluxProcessor,
    SplitEinsumJointProcessor,
    SplitEinsumLinearProcessor,
    qk_norms_problem,
)
from palette.ane.qk import normalize_qk

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass
class SplitEinsumProcessor:
    """Classic diffusers attention processor computing split-einsum attention (chunk_size: v2 if set)."""

    chunk_size: int | None = None

    @staticmethod
    def unsupported(attn: nn.Module) -> str | None:
        """What of `attn` this processor cannot compute, or None."""
        for feature in ("spatial_norm", "added_kv_proj_dim"):
            if getattr(attn, feature, None) is not None:
                return feature
        if attn.to_k.out_features != attn.to_q.out_features:
            return "grouped key/value heads (kv_heads != heads)"
        return qk_norms_problem(attn)

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
        dim_head = attn.to_q.out_channels // attn.heads
        out = split_einsum_attention(
            normalize_qk(attn.norm_q, attn.to_q(x), dim_head),
            normalize_qk(attn.norm_k, attn.to_k(context), dim_head),
            attn.to_v(context),
            heads=attn.heads,
            scale=attn.scale,
            mask=mask_to_ane(attention_mask, x.dtype),
            chunk_size=self.chunk_size,
        )
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.reshape(image_shape) if image_shape is not None else from_ane(out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _to_ane(x: torch.Tensor) -> torch.Tensor:
    """(B, S, C) -> (B, C, 1, S); (B, C, H, W) -> (B, C, 1, H*W)."""
    if x.dim() == 4:
        return x.flatten(2).unsqueeze(2)
    return to_ane(x)


class _Rewrite(NamedTuple):
    processor: Callable[[int | None], object]  # chunk_size -> split-einsum processor
    unsupported: Callable[[nn.Module], str | None]


def _ignored_by(processor: str, *features: str) -> Callable[[nn.Module], str | None]:
    """`unsupported` for a processor that ignores `features` SplitEinsumProcessor would apply."""

    def unsupported(attn: nn.Module) -> str | None:
        for feature in features:
            if getattr(attn, feature, None):
                return f"{feature} (which {processor} ignores)"
        return SplitEinsumProcessor.unsupported(attn)

    return unsupported


# Keyed by exact type: a subclass may compute something else.
REWRITES: dict[type, _Rewrite] = {
    AttnProcessor: _Rewrite(SplitEinsumProcessor, _ignored_by("AttnProcessor", "norm_q", "norm_k")),
    AttnProcessor2_0: _Rewrite(SplitEinsumProcessor, SplitEinsumProcessor.unsupported),
    SanaAttnProcessor2_0: _Rewrite(
        SplitEinsumProcessor,
        _ignored_by("SanaAttnProcessor2_0", "group_norm", "norm_cross", "residual_connection"),
    ),
    JointAttnProcessor2_0: _Rewrite(SplitEinsumJointProcessor, SplitEinsumJointProcessor.unsupported),
    FluxAttnProcessor: _Rewrite(SplitEinsumFluxProcessor, SplitEinsumFluxProcessor.unsupported),
    SanaLinearAttnProcessor2_0: _Rewrite(
        lambda chunk_size: SplitEinsumLinearProcessor(), SplitEinsumLinearProcessor.unsupported
    ),
}


@dataclass
class DiffusersUndo:
    """What `rewrite_diffusers_attention` changed on one attention module, to put it back."""

    attn: nn.Module
    processor: object
    linears: dict[str, nn.Linear]

    def restore(self) -> None:
        for name, linear in self.linears.items():
            _set(self.attn, name, self.attn.get_submodule(name).to_linear(linear))
        self.attn.set_processor(self.processor)


def rewrite_diffusers_attention(name: str, attn: nn.Module, chunk_size: int | None) -> DiffusersUndo:
    """Swap one attention module's projections for Conv1x1 and its processor for its split-einsum form.

    `name` (the module's qualified name) is for error messages. Raises NotImplementedError, with
    `attn` untouched, if its processor or one of the features it uses has no split-einsum form.
    """
    processor = attn.processor
    where = f"split_einsum: {name or type(attn).__name__} ({type(attn).__name__} with {type(processor).__name__})"
    rewrite = REWRITES.get(type(processor))
    if rewrite is None:
        supported = ", ".join(sorted(t.__name__ for t in REWRITES))
        raise NotImplementedError(f"{where}: this processor has no split-einsum form (supported: {supported})")
    problem = rewrite.unsupported(attn)
    if problem is not None:
        raise NotImplementedError(f"{where}: {problem} is not supported")
    linears = {}
    for projection in PROJECTIONS:
        module = _get(attn, projection)
        if module is None:
            continue
        if type(module) is not nn.Linear:
            raise NotImplementedError(f"{where}: {projection} is a {type(module).__name__}, not nn.Linear")
        linears[projection] = module
    undo = DiffusersUndo(attn, processor, linears)
    for projection, linear in linears.items():
        _set(attn, projection, Conv1x1(linear))
    attn.set_processor(rewrite.processor(chunk_size))
    return undo


def _get(attn: nn.Module, dotted: str) -> nn.Module | None:
    """`attn.<dotted>`, or None where it or its parent is missing or None (pre-only blocks)."""
    module: object = attn
    for part in dotted.split("."):
        if module is None:
            return None
        module = module[int(part)] if part.isdigit() else getattr(module, part, None)
    return module


def _set(attn: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(attn.get_submodule(parent) if parent else attn, leaf, module)
