"""Query/key transforms of diffusion transformers in the ANE layout (B, C, 1, S).

qk normalisation (RMSNorm or LayerNorm over each head's channels, or over all channels) and
rotary position embeddings, computed over axis 1 so that no transpose or reshape of the
activations is needed. Norm weights and biases are module parameters read at call time, so the
result follows the original modules exactly.
"""

from __future__ import annotations

import torch
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from torch import nn

QK_NORMS = (nn.RMSNorm, DiffusersRMSNorm, nn.LayerNorm)  # FP32LayerNorm is a LayerNorm


def norm_problem(norm: nn.Module | None) -> str | None:
    """Why `norm` cannot be applied in the ANE layout, or None if it can (or is absent)."""
    if norm is None:
        return None
    if not isinstance(norm, QK_NORMS):
        return f"qk norm {type(norm).__name__}"
    if len(_normalized_shape(norm)) != 1:
        return f"qk norm {type(norm).__name__} over {len(_normalized_shape(norm))} axes"
    return None


def normalize_qk(norm: nn.Module | None, x: torch.Tensor, dim_head: int) -> torch.Tensor:
    """Apply a qk norm to x (B, C, 1, S): per head if it normalises `dim_head` channels (diffusers
    applies it to (B, H, S, D)), across all channels if it normalises C (to (B, S, C))."""
    if norm is None:
        return x
    (size,) = _normalized_shape(norm)
    if size == x.shape[1]:
        return _normalize(norm, x)
    if size == dim_head:
        return torch.cat([_normalize(norm, head) for head in x.split(dim_head, dim=1)], dim=1)
    raise ValueError(f"{type(norm).__name__} of {size} channels fits neither {x.shape[1]} nor heads of {dim_head}")


def _normalized_shape(norm: nn.Module) -> tuple[int, ...]:
    return tuple(norm.dim if isinstance(norm, DiffusersRMSNorm) else norm.normalized_shape)


def _normalize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm` over axis 1 of x (B, D, 1, S), as the module computes it over the last axis.

    x / sqrt(mean(x^2) + eps) is computed as y / sqrt(mean(y^2) + eps / m^2) with y = x / m and m
    the largest |x| (at least 1e-2): the same value for any m > 0, but the squares stay <= 1, so
    they cannot overflow in fp16 on the ANE (coremltools lowers torch's rms_norm the same way).
    """
    if isinstance(norm, nn.LayerNorm):
        x = x - x.mean(dim=1, keepdim=True)
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps  # nn.RMSNorm's default
    m = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-2)
    y = x / m
    x = y * torch.rsqrt(y.pow(2).mean(dim=1, keepdim=True) + eps / m.pow(2))
    if norm.weight is not None:
        x = x * norm.weight[:, None, None]
    bias = getattr(norm, "bias", None)
    if bias is not None:
        x = x + bias[:, None, None]
    return x


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], dim_head: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k (B, C, 1, S), as diffusers' `apply_rotary_emb` with
    `use_real=True`, `use_real_unbind_dim=-1` (FLUX): channels (2i, 2i+1) of each head are rotated
    as a pair by `rotary` = (cos, sin), each (S, dim_head).

    Each head of the result lists its rotated even channels, then its odd ones. q and k get the
    same order, so every q.k (hence the attention) is that of the interleaved layout, and the pairs
    are reached by strided channel slices instead of a reshape to (..., D/2, 2).
    """
    cos, sin = (t.to(q.dtype).transpose(0, 1)[None, :, None, :] for t in rotary)  # (1, D, 1, S)
    heads = q.shape[1] // dim_head
    tables = [t[:, start::2].repeat(1, heads, 1, 1) for t in (cos, sin) for start in (0, 1)]
    return _rotate(q, *tables, dim_head), _rotate(k, *tables, dim_head)


def _rotate(
    x: torch.Tensor,
    cos_even: torch.Tensor,
    cos_odd: torch.Tensor,
    sin_even: torch.Tensor,
    sin_odd: torch.Tensor,
    dim_head: int,
) -> torch.Tensor:
    even, odd = x[:, 0::2], x[:, 1::2]  # (B, C/2, 1, S), heads still in order
    even, odd = even * cos_even - odd * sin_even, odd * cos_odd + even * sin_odd
    half = dim_head // 2
    return torch.cat([p for pair in zip(even.split(half, dim=1), odd.split(half, dim=1)) for p in pair], dim=1)
