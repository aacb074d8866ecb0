"""The fast probe's hot loop on the CPU, compiled with numba: one pass over a layer's weight folds
each per-sample gradient row into its sums per (LUT group, fp16 value rank) and its inner product
with the weight's fp16 rounding, `<g, fp16(W) - W>` -- what `sketch.Streamed` does with several
torch ops (float64 copies, rank lookups, bins, a bincount) that each walk the whole weight.

Two walks: `bin_sums` gives the dense sums per (group, rank) (for few groups; `combine_dense` then
takes them to every candidate's <g, dW>); `group_folds`, for many groups, goes straight to the
candidates' terms, each group's sums living in its task's scratch, and from the same walk gives
the sums over all groups (the per-tensor grouping's).
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


@nb.njit(cache=True)
def _runs(hist, values, index, lut, owner, prefix, out):
    """Add one group's sum_j lut_j S_j - U_j into `out` (rows, candidates): S and U the sums of
    `hist` (rows, ranks) and of hist x value over position j's run of ranks [index[j],
    index[j + 1]) (`owner[j]`: its candidate, -1 for the seam between two candidates); `prefix`
    (2, ranks + 1) is scratch for the prefix sums."""
    n_ranks = values.shape[0]
    for r in range(hist.shape[0]):
        s = 0.0
        u = 0.0
        prefix[0, 0] = 0.0
        prefix[1, 0] = 0.0
        for pos in range(n_ranks):
            s += hist[r, pos]
            u += hist[r, pos] * values[pos]
            prefix[0, pos + 1] = s
            prefix[1, pos + 1] = u
        for j in range(owner.shape[0]):
            c = owner[j]
            if c >= 0:
                a = index[j]
                b = index[j + 1]
                out[r, c] += lut[j] * (prefix[0, b] - prefix[0, a]) - (prefix[1, b] - prefix[1, a])


@nb.njit(cache=True)
def _combine_dense(hist, values, index, lut, owner, out):
    prefix = np.empty((2, values.shape[0] + 1))
    for grp in range(hist.shape[1]):
        _runs(hist[:, grp], values, index[grp], lut[grp], owner, prefix, out)


@nb.njit(parallel=True, cache=True)
def _group_folds(bits, g, w, rank_of_bits, value_of_bits, values, index, lut, owner, out, resid, whole):
    """Per lane (a task each, taking every lanes-th group): each group's rows summed per rank in the
    lane's scratch and turned into its candidates' terms (`_runs`), added into the lane's `out`;
    the fp16 residual; and, when `whole` has lanes, the lane's sums over its groups."""
    rows, numel = g.shape
    n_groups = index.shape[0]
    n_ranks = values.shape[0]
    per_group = numel // n_groups
    lanes = resid.shape[0]
    for lane in nb.prange(lanes):
        hist = np.empty((rows, n_ranks))
        prefix = np.empty((2, n_ranks + 1))
        for grp in range(lane, n_groups, lanes):
            hist[:] = 0.0
            _fold(bits, g, w, rank_of_bits, value_of_bits, grp * per_group, (grp + 1) * per_group, hist, resid[lane])
            _runs(hist, values, index[grp], lut[grp], owner, prefix, out[lane])
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


def combine_dense(hist: torch.Tensor, values: torch.Tensor, index: np.ndarray, lut: np.ndarray, owner: np.ndarray,
                  n_candidates: int) -> torch.Tensor:
    """(rows, candidates) float64 sum_j lut_j S_j - U_j from the dense per-(group, rank) sums
    `hist` (rows, groups, ranks) float64 (`sketch.Thresholds` gives index, lut, owner)."""
    out = np.zeros((hist.shape[0], n_candidates))
    _combine_dense(hist.numpy(), values.numpy(), index, lut, owner, out)
    return torch.from_numpy(out)


def group_folds(w: torch.Tensor, gs: torch.Tensor, rank_of_bits: torch.Tensor, values: torch.Tensor,
                index: np.ndarray, lut: np.ndarray, owner: np.ndarray, n_candidates: int, whole: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For CPU tensors and many groups, what `bin_sums` then `combine_dense` give without the dense
    (groups, ranks) sums: (b, candidates) float64, (b,) `<g_s, fp16(W) - W>`, and, if `whole`, the
    sums per rank over all groups, (b, 1, ranks) float64 (the one-group grouping's, from the same
    walk), else None. The groups are split over `MIN_TASKS` lanes, each keeping one group's sums
    at a time in a scratch of its own."""
    wf, bits, g = _arrays(w, gs)
    rows = g.shape[0]
    lanes = min(index.shape[0], MIN_TASKS)
    out = np.zeros((lanes, rows, n_candidates))
    resid = np.zeros((lanes, rows))
    sums = np.zeros((lanes if whole else 0, rows, len(values)))
    _group_folds(bits, g, wf, rank_of_bits.numpy(), VALUE_OF_BITS, values.numpy(), index, lut, owner, out, resid, sums)
    total = torch.from_numpy(sums.sum(0)[:, None, :]) if whole else None
    return torch.from_numpy(out.sum(0)), torch.from_numpy(resid.sum(0)), total
