"""Split-einsum processors for the attention of diffusion transformers (SD3, FLUX, SANA).

Each mirrors one diffusers processor, computing in the ANE layout (B, C, 1, S) with the module's
projections as `Conv1x1` under their original names (see `diffusers_attention`, which swaps them
in and out):

- `SplitEinsumJointProcessor` <- `JointAttnProcessor2_0` (SD3/SD3.5 MMDiT): the sample's and the
  context's queries, keys and values (`to_*`, `add_*_proj`, each with its optional qk norm) are
  joined along the sequence axis, sample first, attended together and split again; `to_add_out`
  projects the context unless the block is context-pre-only. Like the original, it ignores masks.
- `SplitEinsumFluxProcessor` <- `FluxAttnProcessor` on `FluxAttention`: the same with the context
  first, RMS qk norms and rotary embeddings on the joined sequence; single-stream blocks (no
  context, `pre_only`) return the attention without output projection, as the original does.
- `SplitEinsumLinearProcessor` <- `SanaLinearAttnProcessor2_0`: ReLU-kernel linear attention.

PixArt and SANA cross-attention (`AttnProcessor2_0`, `SanaAttnProcessor2_0`) are handled by
`diffusers_attention.SplitEinsumProcessor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from palette.ane.attention import from_ane, linear_attention, mask_to_ane, split_einsum_attention, to_ane
from palette.ane.qk import norm_problem, normalize_qk, rotate_qk

QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def qk_norms_problem(attn: nn.Module) -> str | None:
    """The first qk norm of `attn` that cannot run in the ANE layout, described, or None."""
    for name in QK_NORMS:
        problem = norm_problem(getattr(attn, name, None))
        if problem is not None:
            return f"{name} ({problem})"
    return None


@dataclass
class SplitEinsumJointProcessor:
    """`JointAttnProcessor2_0` in split-einsum form (chunk_size: v2 if set)."""

    chunk_size: int | None = None

    @staticmethod
    def unsupported(attn: nn.Module) -> str | None:
        """What of `attn` this processor cannot compute, or None."""
        if attn.add_k_proj is not None and attn.add_q_proj is None:
            return "added key/value projections without add_q_proj"
        return qk_norms_problem(attn)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x, context = _joint_attention(
            attn, hidden_states, encoder_hidden_states, context_first=False, chunk_size=self.chunk_size
        )
        x = from_ane(attn.to_out[1](attn.to_out[0](x)))
        if context is None:
            return x
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return x, from_ane(context)


@dataclass
class SplitEinsumFluxProcessor:
    """`FluxAttnProcessor` in split-einsum form (chunk_size: v2 if set)."""

    chunk_size: int | None = None

    @staticmethod
    def unsupported(attn: nn.Module) -> str | None:
        """What of `attn` this processor cannot compute, or None."""
        if attn.fused_projections:
            return "fused projections (to_qkv)"
        return qk_norms_problem(attn)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if image_rotary_emb is not None and not isinstance(image_rotary_emb, (tuple, list)):
            raise NotImplementedError("split-einsum FLUX attention takes rotary embeddings as (cos, sin)")
        if attention_mask is not None and attention_mask.dim() == 3:
            raise NotImplementedError("split-einsum FLUX attention takes masks of rank 2 or 4, not 3")
        x, context = _joint_attention(
            attn,
            hidden_states,
            encoder_hidden_states,
            context_first=True,
            chunk_size=self.chunk_size,
            mask=attention_mask,
            rotary=image_rotary_emb,
        )
        if context is None:
            return from_ane(x)
        return from_ane(attn.to_out[1](attn.to_out[0](x))), from_ane(attn.to_add_out(context))


@dataclass
class SplitEinsumLinearProcessor:
    """`SanaLinearAttnProcessor2_0` in the ANE layout; v1 and v2 alike (see `linear_attention`)."""

    @staticmethod
    def unsupported(attn: nn.Module) -> str | None:
        """What of `attn` this processor cannot compute, or None."""
        return qk_norms_problem(attn)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The original ignores attention_mask too.
        x = to_ane(hidden_states)
        context = x if encoder_hidden_states is None else to_ane(encoder_hidden_states)
        channels = attn.to_q.out_channels
        dim_head = channels // attn.heads
        out = linear_attention(
            normalize_qk(attn.norm_q, attn.to_q(x), dim_head),
            normalize_qk(attn.norm_k, attn.to_k(context), dim_head),
            attn.to_v(context),
            heads=attn.heads,
        )
        out = from_ane(attn.to_out[1](attn.to_out[0](out)))
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


def _joint_attention(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    *,
    context_first: bool,
    chunk_size: int | None,
    mask: torch.Tensor | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of the sample (and context) tokens over all of them, before the output projections:
    (sample (B, C, 1, S), context (B, C, 1, S_ctx) or None)."""
    x = to_ane(hidden_states)
    dim_head = attn.to_q.out_channels // attn.heads
    q = normalize_qk(attn.norm_q, attn.to_q(x), dim_head)
    k = normalize_qk(attn.norm_k, attn.to_k(x), dim_head)
    v = attn.to_v(x)
    if encoder_hidden_states is not None:
        c = to_ane(encoder_hidden_states)
        cq = normalize_qk(getattr(attn, "norm_added_q", None), attn.add_q_proj(c), dim_head)
        ck = normalize_qk(getattr(attn, "norm_added_k", None), attn.add_k_proj(c), dim_head)
        cv = attn.add_v_proj(c)
        pairs = ((cq, q), (ck, k), (cv, v)) if context_first else ((q, cq), (k, ck), (v, cv))
        q, k, v = (torch.cat(pair, dim=3) for pair in pairs)
    if rotary is not None:
        q, k = rotate_qk(q, k, rotary, dim_head)
    out = split_einsum_attention(
        q, k, v, heads=attn.heads, scale=dim_head**-0.5, mask=mask_to_ane(mask, q.dtype), chunk_size=chunk_size
    )
    if encoder_hidden_states is None:
        return out, None
    n_context, n_sample = encoder_hidden_states.shape[1], hidden_states.shape[1]
    if context_first:
        context, out = out.split([n_context, n_sample], dim=3)
    else:
        out, context = out.split([n_sample, n_context], dim=3)
    return out, context
