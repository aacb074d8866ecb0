"""Split-einsum attention for transformers text encoders (BERT-style and CLIP-style).

The attention module is replaced by a wrapper that keeps the original submodules under the same
names (so `encoder.layer.0.attention.self.query` and `text_model.encoder.layers.0.self_attn.q_proj`
still resolve), their projection Linears swapped for `Conv1x1`. The wrapper transposes to
(B, C, 1, S) once, runs projections and split-einsum attention there, and transposes back after the
output projection. Masks come as transformers builds them (additive float or boolean, (B, 1, Sq, Sk));
a causal flag without a mask (CLIP text under SDPA) becomes an explicit causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from palette.ane.attention import causal_mask, from_ane, mask_to_ane, split_einsum_attention, to_ane
from palette.ane.conv import Conv1x1


def _is_linear(module: object) -> bool:
    return type(module) is nn.Linear


def is_bert_attention(module: nn.Module) -> bool:
    """BertAttention and its copies (RoBERTa, MiniLM, ...): `.self.{query,key,value}`, `.output.dense`."""
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    return (
        isinstance(inner, nn.Module)
        and all(_is_linear(getattr(inner, n, None)) for n in ("query", "key", "value"))
        and hasattr(inner, "num_attention_heads")
        and isinstance(output, nn.Module)
        and _is_linear(getattr(output, "dense", None))
        and hasattr(output, "LayerNorm")
    )


def is_clip_attention(module: nn.Module) -> bool:
    """CLIPAttention and its copies: `{q,k,v,out}_proj` Linears, `num_heads`, `scale`."""
    return (
        all(_is_linear(getattr(module, n, None)) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
        and hasattr(module, "num_heads")
        and hasattr(module, "scale")
    )


def _mask(
    mask: torch.Tensor | None, is_causal: bool, length: int, like: torch.Tensor
) -> torch.Tensor | None:
    if mask is None and is_causal and length > 1:
        return causal_mask(length, like.dtype, like.device)
    return mask_to_ane(mask, like.dtype)


class SplitEinsumBertAttention(nn.Module):
    """Drop-in for BertAttention: children `self` (query/key/value) and `output` (dense, LayerNorm)."""

    def __init__(self, original: nn.Module, chunk_size: int | None) -> None:
        super().__init__()
        self.self = original.self
        self.output = original.output
        self.is_cross_attention = getattr(original, "is_cross_attention", False)
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: object | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        if past_key_values is not None:
            raise NotImplementedError("split-einsum attention does not support a key/value cache")
        inner = self.self
        x = to_ane(hidden_states)
        if self.is_cross_attention:
            context, mask = to_ane(encoder_hidden_states), encoder_attention_mask
        else:
            context, mask = x, attention_mask
        is_causal = bool(kwargs.get("is_causal", getattr(inner, "is_causal", False)))
        out = split_einsum_attention(
            inner.query(x),
            inner.key(context),
            inner.value(context),
            heads=inner.num_attention_heads,
            scale=getattr(inner, "scaling", inner.attention_head_size**-0.5),
            mask=_mask(mask, is_causal and not self.is_cross_attention, x.shape[3], x),
            chunk_size=self.chunk_size,
        )
        output = self.output
        out = output.dropout(from_ane(output.dense(out)))
        return output.LayerNorm(out + hidden_states), None


class SplitEinsumCLIPAttention(nn.Module):
    """Drop-in for CLIPAttention: children `q_proj`, `k_proj`, `v_proj`, `out_proj`."""

    def __init__(self, original: nn.Module, chunk_size: int | None) -> None:
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, getattr(original, name))
        self.num_heads = original.num_heads
        self.scale = original.scale
        self.is_causal = getattr(original, "is_causal", False)
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        causal_attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        x = to_ane(hidden_states)
        if causal_attention_mask is not None:  # transformers 4.x passes the two masks separately
            attention_mask = (
                causal_attention_mask if attention_mask is None else attention_mask + causal_attention_mask
            )
        is_causal = bool(kwargs.get("is_causal", self.is_causal))
        out = split_einsum_attention(
            self.q_proj(x),
            self.k_proj(x),
            self.v_proj(x),
            heads=self.num_heads,
            scale=self.scale,
            mask=_mask(attention_mask, is_causal, x.shape[3], x),
            chunk_size=self.chunk_size,
        )
        return from_ane(self.out_proj(out)), None


BERT_LINEARS = ("self.query", "self.key", "self.value", "output.dense")
CLIP_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class TextUndo:
    """What `rewrite_text_attention` changed: the wrapper in `parent.<attr>` and the Linears it hides."""

    parent: nn.Module
    attr: str
    original: nn.Module
    linears: dict[str, nn.Linear]

    def restore(self) -> None:
        wrapper = getattr(self.parent, self.attr)
        for name, linear in self.linears.items():
            owner, leaf = _owner(wrapper, name)
            setattr(owner, leaf, getattr(owner, leaf).to_linear(linear))
        setattr(self.parent, self.attr, self.original)


def rewrite_text_attention(parent: nn.Module, attr: str, chunk_size: int | None) -> TextUndo:
    """Replace `parent.<attr>` (a BERT- or CLIP-style attention) with its split-einsum wrapper."""
    original = getattr(parent, attr)
    if is_bert_attention(original):
        wrapper, names = SplitEinsumBertAttention(original, chunk_size), BERT_LINEARS
    elif is_clip_attention(original):
        wrapper, names = SplitEinsumCLIPAttention(original, chunk_size), CLIP_LINEARS
    else:
        raise TypeError(f"{type(original).__name__} is not a BERT- or CLIP-style attention")
    linears = {}
    for name in names:
        owner, leaf = _owner(wrapper, name)
        linears[name] = getattr(owner, leaf)
        setattr(owner, leaf, Conv1x1(linears[name]))
    setattr(parent, attr, wrapper)
    return TextUndo(parent, attr, original, linears)


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    head, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(head) if head else root), leaf
