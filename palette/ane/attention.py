"""Split-einsum attention in the ANE layout (B, C, 1, S).

Every tensor stays rank 4 with channels on axis 1. Heads are separate channel slices, each attended
with two einsums that coremltools maps to its native rank-4 `einsum` op (no transpose, no reshape):
`bchq,bkhc->bkhq` (scores, keys on axis 1) and `bkhq,bchk->bchq` (weighted values). Softmax runs over
axis 1, the key axis. Variant v2 also cuts the query axis into chunks, which bounds the size of the
score tensors for long sequences (large latents). Linear attention (SANA) uses the same two einsums
on a (D, D) key-value product instead of a score matrix.
"""

from __future__ import annotations

import torch

VARIANTS = ("v1", "v2")


def to_ane(x: torch.Tensor) -> torch.Tensor:
    """(B, S, C) -> (B, C, 1, S)."""
    return x.transpose(1, 2).unsqueeze(2)


def from_ane(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, S) -> (B, S, C)."""
    return x.squeeze(2).transpose(1, 2)


def split_einsum_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    scale: float,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Multi-head attention of q (B, C, 1, Sq) over k, v (B, C, 1, Sk); returns (B, C, 1, Sq).

    `mask` is additive, laid out (B, Sk, 1 or heads, 1 or Sq) (see `mask_to_ane`). With
    `chunk_size`, queries are processed `chunk_size` at a time (v2).
    """
    channels, sq = q.shape[1], q.shape[3]
    if channels % heads:
        raise ValueError(f"{channels} channels do not split into {heads} heads")
    dim_head = channels // heads
    q = q * scale
    k = k.transpose(1, 3)  # (B, Sk, 1, C): the layout the first einsum wants for keys
    # One split op per tensor (not one slice per head) keeps the converted program small.
    qs, ks, vs = q.split(dim_head, dim=1), k.split(dim_head, dim=3), v.split(dim_head, dim=1)
    if mask is not None and mask.shape[2] > 1:
        masks = mask.split(1, dim=2)
    else:
        masks = (mask,) * heads
    step = sq if chunk_size is None else chunk_size
    outputs = []
    for qh, kh, vh, mh in zip(qs, ks, vs, masks):
        q_chunks = qh.split(step, dim=3) if step < sq else (qh,)
        if mh is not None and mh.shape[3] > 1 and step < sq:
            m_chunks = mh.split(step, dim=3)
        else:
            m_chunks = (mh,) * len(q_chunks)
        chunks = []
        for qc, mc in zip(q_chunks, m_chunks):
            scores = torch.einsum("bchq,bkhc->bkhq", qc, kh)
            if mc is not None:
                scores = scores + mc
            chunks.append(torch.einsum("bkhq,bchk->bchq", scores.softmax(dim=1), vh))
        outputs.append(chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=3))
    return torch.cat(outputs, dim=1)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """ReLU-kernel linear attention (SANA's) of q (B, C, 1, Sq) over k, v (B, C, 1, Sk) -> (B, C, 1, Sq).

    Per head, with Q = relu(q), K = relu(k): out = (V K^T) Q / (1^T K^T Q + 1e-15). The (D, D)
    key-value product takes the place of the (Sk, Sq) score matrix, so the cost is linear in the
    sequence and there is nothing for v2's query chunks to bound: both variants compute this.
    K is divided by Sk (and the 1e-15 with it), which leaves the ratio as it is but keeps the sums
    over keys averages, in fp16 range on the ANE however long the sequence.
    """
    channels = q.shape[1]
    if channels % heads:
        raise ValueError(f"{channels} channels do not split into {heads} heads")
    dim_head = channels // heads
    per_key = 1.0 / int(k.shape[3])  # int(): a constant when traced (a traced size is an int tensor)
    q, k = q.relu(), (k.relu() * per_key).transpose(1, 3)  # keys (B, Sk, 1, C), as in split_einsum_attention
    outputs = []
    for qh, kh, vh in zip(q.split(dim_head, dim=1), k.split(dim_head, dim=3), v.split(dim_head, dim=1)):
        kv = torch.einsum("bchq,bkhc->bkhq", kh, vh)  # (B, D_v, 1, D_k): sum over keys of v k^T
        k_sum = kh.sum(dim=1, keepdim=True)  # (B, 1, 1, D_k)
        numerator = torch.einsum("bkhq,bchk->bchq", qh, kv)
        denominator = torch.einsum("bkhq,bchk->bchq", qh, k_sum)
        outputs.append(numerator / (denominator + 1e-15 * per_key))
    return torch.cat(outputs, dim=1)


def mask_to_ane(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An attention mask in the library layouts -> additive (B, Sk, H', Sq') for the ANE layout.

    Accepts (B, Sk), (B, Sq', Sk) or (B, H', Sq', Sk) with H', Sq' full or 1; boolean masks mean
    True = attend, float masks are additive (as transformers and diffusers pass them).
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    else:
        mask = mask.to(dtype)
    if mask.dim() == 2:
        return mask[:, :, None, None]
    if mask.dim() == 3:
        return mask.transpose(1, 2).unsqueeze(2)
    if mask.dim() == 4:
        return mask.permute(0, 3, 1, 2)
    raise ValueError(f"attention mask of rank {mask.dim()} is not supported")


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask in the ANE layout (1, Sk, 1, Sq): key k is hidden from query q < k."""
    keys = torch.arange(length, device=device)[:, None]
    queries = torch.arange(length, device=device)[None, :]
    blocked = torch.zeros(length, length, dtype=dtype, device=device)
    blocked = blocked.masked_fill(keys > queries, torch.finfo(dtype).min)
    return blocked[None, :, None, :]
