"""The fast probe's hot loop on the CPU, compiled with numba: one pass over a layer's weight folds
each per-sample gradient row into its sums per (LUT group, fp16 value rank) and its inner product
with the weight's fp16 rounding, `<g, fp16(W) - W>` -- what `sketch.Streamed` does with several
torch ops (float64 copies, rank lookups, bins, a bincount) that each walk the whole weight.

Two kernels: `bin_sums` gives the dense sums per (group, rank) (for few groups); `prefix_at_bounds`
gives, for many groups, only the prefix sums at each group's LUT bounds, each group's sums living
in its task's scratch, and from the same walk the sums over all groups (the per-tensor grouping's).
The work is split into fixed tasks (a group or a slice of one when there are few groups; a fixed
set of groups when there are many), each with its own partial sums, then added in task order: the
result does not depend on the number of threads.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from .. import _exact1d  # noqa: F401  (sets numba's threading layer before any parallel kernel runs)

MIN_TASKS = 16  # slices per row when the groups are fewer, so both cores get work
PARALLEL_NUMEL = 1 << 18  # smaller weights are folded on the calling thread


@nb.njit(cache=True)
def _fold(bits, g, w, rank_of_bits, value_of_bits, lo, hi, hist, resid):
    """Every row of `g` over elements [lo, hi) added into `hist` (rows, ranks) and `resid` (rows,)."""
    for r in range(g.shape[0]):
        acc = 0.0
        out = hist[r]
        for e in range(lo, hi):
            b = np.int64(bits[e]) & 0xFFFF
            gv = np.float64(g[r, e])
            out[rank_of_bits[b]] += gv
            acc += gv * (value_of_bits[b] - np.float64(w[e]))
        resid[r] += acc


@nb.njit(parallel=True, cache=True)
def _tasks_parallel(bits, g, w, rank_of_bits, value_of_bits, bounds, hist, resid):
    for t in nb.prange(bounds.shape[0]):
        _fold(bits, g, w, rank_of_bits, value_of_bits, bounds[t, 0], bounds[t, 1], hist[t], resid[t])


@nb.njit(cache=True)
def _tasks_serial(bits, g, w, rank_of_bits, value_of_bits, bounds, hist, resid):
    for t in range(bounds.shape[0]):
        _fold(bits, g, w, rank_of_bits, value_of_bits, bounds[t, 0], bounds[t, 1], hist[t], resid[t])


@nb.njit(parallel=True, cache=True)
def _prefix_at_bounds(bits, g, w, rank_of_bits, value_of_bits, values, sorted_bounds, s_out, u_out, resid, whole):
    """Per lane (a task each, taking every lanes-th group): each group's rows summed per rank in the
    lane's scratch, then the prefix sums of the sums and of sums x value at every bound
    (ascending), the fp16 residual, and, when `whole` has lanes, the lane's sums over its groups."""
    rows, numel = g.shape
    n_groups, n_bounds = sorted_bounds.shape
    n_ranks = values.shape[0]
    per_group = numel // n_groups
    lanes = resid.shape[0]
    for lane in nb.prange(lanes):
        hist = np.empty((rows, n_ranks))
        for grp in range(lane, n_groups, lanes):
            hist[:] = 0.0
            _fold(bits, g, w, rank_of_bits, value_of_bits, grp * per_group, (grp + 1) * per_group, hist, resid[lane])
            for r in range(rows):
                s = 0.0
                u = 0.0
                k = 0
                for pos in range(n_ranks + 1):
                    while k < n_bounds and sorted_bounds[grp, k] == pos:
                        s_out[r, grp, k] = s
                        u_out[r, grp, k] = u
                        k += 1
                    if pos < n_ranks:
                        s += hist[r, pos]
                        u += hist[r, pos] * values[pos]
            if whole.shape[0]:
                whole[lane] += hist


def _value_of_bits() -> np.ndarray:
    """The fp16 value of every bit pattern, as float64."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)


VALUE_OF_BITS = _value_of_bits()


def _arrays(w: torch.Tensor, gs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flat fp32 weight, its fp16 bit patterns and the fp32 gradient rows, as numpy arrays."""
    wf = w.detach().reshape(-1).float().contiguous()
    return wf.numpy(), wf.to(torch.float16).view(torch.int16).numpy(), gs.detach().float().contiguous().numpy()


def bin_sums(w: torch.Tensor, gs: torch.Tensor, rank_of_bits: torch.Tensor, n_ranks: int,
             n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For CPU tensors: per-sample gradients `gs` (b, numel) summed per (group, rank) bin,
    (b, n_groups, n_ranks) float64, the groups being equal consecutive slices of the flattened
    weight `w`, ranks looked up from each weight's fp16 bit pattern in `rank_of_bits` (65536,);
    and (b,) float64 `<g_s, fp16(W) - W>`. Small layers run on the calling thread (a parallel
    launch costs more than their work)."""
    wf, bits, g = _arrays(w, gs)
    rows, numel = g.shape
    parallel = numel >= PARALLEL_NUMEL
    splits = max(1, -(-MIN_TASKS // n_groups)) if parallel else 1
    per_group = numel // n_groups
    part = -(-per_group // splits)
    lo = (np.arange(n_groups)[:, None] * per_group + np.arange(splits)[None, :] * part).reshape(-1)
    hi = np.minimum(lo + part, np.repeat(np.arange(1, n_groups + 1) * per_group, splits))
    hist = np.zeros((n_groups * splits, rows, n_ranks))
    resid = np.zeros((n_groups * splits, rows))
    run = _tasks_parallel if parallel else _tasks_serial
    run(bits, g, wf, rank_of_bits.numpy(), VALUE_OF_BITS, np.stack([lo, hi], 1), hist, resid)
    hist = hist.reshape(n_groups, splits, rows, n_ranks).sum(1).transpose(1, 0, 2)
    return torch.from_numpy(np.ascontiguousarray(hist)), torch.from_numpy(resid.sum(0))


def prefix_at_bounds(w: torch.Tensor, gs: torch.Tensor, rank_of_bits: torch.Tensor, values: torch.Tensor,
                     sorted_bounds: torch.Tensor, whole: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For CPU tensors and many groups: with H the per-sample gradients summed per (group, rank)
    bin, the prefix sums of H and of H x `values` (the ranks' fp16 values) at every bound of
    `sorted_bounds` (groups, T) int64, ascending per group: two (b, groups, T) float64; (b,)
    `<g_s, fp16(W) - W>`; and, if `whole`, H summed over the groups, (b, 1, ranks) float64 (the
    one-group grouping's sums from the same walk), else None. The dense (groups, ranks) sums are
    never made: the groups are split over `MIN_TASKS` lanes, each keeping one group's sums at a
    time in a scratch of its own."""
    wf, bits, g = _arrays(w, gs)
    rows = g.shape[0]
    n_groups, n_bounds = sorted_bounds.shape
    lanes = min(n_groups, MIN_TASKS)
    s_out = np.empty((rows, n_groups, n_bounds))
    u_out = np.empty((rows, n_groups, n_bounds))
    resid = np.zeros((lanes, rows))
    sums = np.zeros((lanes if whole else 0, rows, len(values)))
    _prefix_at_bounds(bits, g, wf, rank_of_bits.numpy(), VALUE_OF_BITS, values.numpy(), sorted_bounds.numpy(),
                      s_out, u_out, resid, sums)
    total = torch.from_numpy(sums.sum(0)[:, None, :]) if whole else None
    return torch.from_numpy(s_out), torch.from_numpy(u_out), torch.from_numpy(resid.sum(0)), total
