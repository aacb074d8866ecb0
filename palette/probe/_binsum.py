"""The fast probe's hot loop on the CPU, compiled with numba: one pass over a layer's weight folds
each per-sample gradient row into its sums per (LUT group, fp16 value rank) and its inner product
with the weight's fp16 rounding, `<g, fp16(W) - W>` -- what `sketch.Streamed` does with several
torch ops (float64 copies, rank lookups, bins, a bincount) that each walk the whole weight.

The work is split into fixed tasks (a group, or a slice of one when there are few groups), each
with its own partial sums, then added in task order: the result does not depend on the number of
threads.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from .. import _exact1d  # noqa: F401  (sets numba's threading layer before any parallel kernel runs)

MIN_TASKS = 16  # slices per row when the groups are fewer, so both cores get work


@nb.njit(parallel=True, cache=True)
def _bin_sums(bits, g, w, rank_of_bits, value_of_bits, n_groups, n_ranks, splits):
    rows, numel = g.shape
    per_group = numel // n_groups
    part = (per_group + splits - 1) // splits
    tasks = n_groups * splits
    # one task per group writes its own row of the sums; slices of a group need partial sums
    partial = np.zeros((rows, tasks, n_ranks))
    resid = np.zeros((rows, tasks))
    for t in nb.prange(tasks):
        lo = (t // splits) * per_group + (t % splits) * part
        hi = min(lo + part, (t // splits + 1) * per_group)
        for r in range(rows):
            acc = 0.0
            out = partial[r, t]
            for e in range(lo, hi):
                b = np.int64(bits[e]) & 0xFFFF
                gv = np.float64(g[r, e])
                out[rank_of_bits[b]] += gv
                acc += gv * (value_of_bits[b] - np.float64(w[e]))
            resid[r, t] = acc
    res = np.zeros(rows)
    for r in range(rows):
        for t in range(tasks):
            res[r] += resid[r, t]
    if splits == 1:
        return partial, res
    hist = np.zeros((rows, n_groups, n_ranks))
    for r in range(rows):
        for t in range(tasks):
            hist[r, t // splits] += partial[r, t]
    return hist, res


def _value_of_bits() -> np.ndarray:
    """The fp16 value of every bit pattern, as float64."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)


VALUE_OF_BITS = _value_of_bits()


def bin_sums(w: torch.Tensor, gs: torch.Tensor, rank_of_bits: torch.Tensor, n_ranks: int,
             n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For CPU tensors: per-sample gradients `gs` (b, numel) summed per (group, rank) bin,
    (b, n_groups, n_ranks) float64, the groups being equal consecutive slices of the flattened
    weight `w`, ranks looked up from each weight's fp16 bit pattern in `rank_of_bits` (65536,);
    and (b,) float64 `<g_s, fp16(W) - W>`."""
    wf = w.detach().reshape(-1).float().contiguous()
    bits = wf.to(torch.float16).view(torch.int16).numpy()
    g = gs.detach().float().contiguous().numpy()
    splits = max(1, -(-MIN_TASKS // n_groups))
    hist, resid = _bin_sums(bits, g, wf.numpy(), rank_of_bits.numpy(), VALUE_OF_BITS, n_groups, n_ranks, splits)
    return torch.from_numpy(hist), torch.from_numpy(resid)
