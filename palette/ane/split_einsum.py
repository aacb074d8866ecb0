"""`split_einsum` / `restore_attention`: rewrite every attention of a model for the ANE, reversibly.

Covers diffusers attention modules (UNet self- and cross-attention; the joint, rotary and linear
attention of SD3, FLUX, PixArt and SANA transformers) and BERT- or CLIP-style attention of
transformers text encoders. A diffusers attention whose processor has no split-einsum form is an
error naming it, and the model is left as it was. Layer names are unchanged, so recipes and palettes keyed by
fully-qualified names keep working, and a palettization done while rewritten survives the restore.
The undo information lives on the model itself (so it travels with a deepcopy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

from palette.ane.attention import VARIANTS
from palette.ane.diffusers_attention import DiffusersUndo, rewrite_diffusers_attention
from palette.ane.text_attention import (
    TextUndo,
    is_bert_attention,
    is_clip_attention,
    rewrite_text_attention,
)

_STATE = "_palette_split_einsum"


@dataclass
class SplitEinsumState:
    """How a model was rewritten, and how to undo it."""

    variant: str
    chunk_size: int | None
    modules: list[str] = field(default_factory=list)  # qualified names of the rewritten attentions
    undo: list[DiffusersUndo | TextUndo] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Number of attention modules rewritten."""
        return len(self.modules)


def split_einsum(model: nn.Module, variant: str = "v1", chunk_size: int = 512) -> SplitEinsumState:
    """Rewrite, in place, every attention of `model` into split-einsum form (ANE layout).

    v1 attends each head over the whole query sequence; v2 also splits the query sequence into
    chunks of `chunk_size`. Raises RuntimeError if `model` (or a submodule) is already rewritten,
    and ValueError if it has no attention this knows how to rewrite.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if is_split_einsum(model):
        raise RuntimeError("model is already split-einsum; call restore_attention first")
    state = SplitEinsumState(variant, chunk_size if variant == "v2" else None)
    try:
        _rewrite(model, state)
    except BaseException:
        _undo(state)
        raise
    if not state.undo:
        raise ValueError(f"{type(model).__name__} has no diffusers, BERT- or CLIP-style attention")
    object.__setattr__(model, _STATE, state)
    return state


def restore_attention(model: nn.Module) -> None:
    """Undo `split_einsum(model)` exactly: original modules, processors and (shared) weights.

    Raises RuntimeError if `model` was not rewritten by `split_einsum`.
    """
    state = getattr(model, _STATE, None)
    if state is None:
        raise RuntimeError("model was not rewritten by split_einsum")
    _undo(state)
    object.__delattr__(model, _STATE)


def is_split_einsum(model: nn.Module) -> bool:
    """True if `model` or any of its submodules is currently rewritten by `split_einsum`."""
    return any(hasattr(module, _STATE) for module in model.modules())


def _rewrite(model: nn.Module, state: SplitEinsumState) -> None:
    # Collect first: rewriting replaces modules while named_modules() would still be walking them.
    if is_bert_attention(model) or is_clip_attention(model):
        raise ValueError("pass the model that contains the attention module, not the module itself")
    text: list[tuple[str, nn.Module, str]] = []
    diffusers: list[tuple[str, nn.Module]] = []
    for prefix, parent in model.named_modules():
        for attr, child in parent.named_children():
            if is_bert_attention(child) or is_clip_attention(child):
                text.append((f"{prefix}.{attr}" if prefix else attr, parent, attr))
        if isinstance(parent, (Attention, AttentionModuleMixin)):  # FluxAttention is the latter
            diffusers.append((prefix, parent))
    for name, attn in diffusers:
        state.undo.append(rewrite_diffusers_attention(name, attn, state.chunk_size))
        state.modules.append(name)
    for name, parent, attr in text:
        state.undo.append(rewrite_text_attention(parent, attr, state.chunk_size))
        state.modules.append(name)


def _undo(state: SplitEinsumState) -> None:
    # Pop as we go: an interrupted restore can be resumed without undoing anything twice.
    while state.undo:
        state.undo[-1].restore()
        state.undo.pop()
