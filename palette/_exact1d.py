"""Exact, globally optimal 1D k-means of fp16 values, compiled with numba.

fp16 has at most 63,488 distinct finite values, so a tensor of any size reduces in one O(n) pass
to a weighted histogram over them. The optimal partition of the sorted distinct values into k
contiguous clusters is then a dynamic program, D[k][j] = min_i D[k-1][i-1] + cost(i, j), whose
argmin is monotone in j and in k (the cost is Monge). Two exact solvers share it:

- layered: each layer by divide and conquer within the bounds the previous layer gives. One
  pass up to K yields the optimal cost, and partition, of every cluster count up to K
  (`every_cost`, 2-entry LUTs, and the fallback below). Its work grows with K.
- Lagrangian (Aggarwal, Schieber and Tokuyama): D is convex in k, so for each k there is a price
  per cluster at which the unconstrained optimum of cost + price * clusters has exactly k
  clusters, and is then the optimal k-partition. Each price is one O(n log n) pass whatever k
  is; a few passes find the price, so the work hardly grows with k.

Values are handled as *keys*: the fp16 bit pattern mapped so that integer order is value order.
"""

from __future__ import annotations

import numba as nb
import numpy as np

# numba's default OpenMP layer leaves its threads spinning after each parallel call, which slows
# the torch ops that follow (forward passes between fits) by 10-100x on a 2-core machine.
nb.config.THREADING_LAYER = "workqueue"

N_KEYS = 1 << 16


def _key_values() -> np.ndarray:
    """The fp16 value of every key, as float64 (NaN where the key is a NaN pattern)."""
    keys = np.arange(N_KEYS, dtype=np.uint32)
    bits = np.where(keys & 0x8000, keys ^ 0x8000, ~keys & 0xFFFF).astype(np.uint16)
    return bits.view(np.float16).astype(np.float64)


KEY_VALUES = _key_values()


@nb.njit(parallel=True, cache=True)
def fp16_keys(bits: np.ndarray) -> np.ndarray:
    """Order-preserving uint16 keys of fp16 bit patterns (any shape, flattened); -0 maps to +0."""
    flat = bits.ravel()
    out = np.empty(flat.size, dtype=np.uint16)
    for e in nb.prange(flat.size):
        b = flat[e]
        if b == 0x8000:
            b = 0
        out[e] = (b | 0x8000) if (b & 0x8000) == 0 else (~b & 0xFFFF)
    return out


@nb.njit(parallel=True, cache=True)
def count_nonfinite(bits: np.ndarray) -> int:
    """How many fp16 bit patterns are Inf or NaN (all exponent bits set)."""
    n = 0
    for e in nb.prange(bits.size):
        if (bits[e] & 0x7C00) == 0x7C00:
            n += 1
    return n


@nb.njit(cache=True)
def _histogram(keys: np.ndarray, weights: np.ndarray, key_values: np.ndarray):
    """Sorted distinct values of one group and their total weights (counts when unweighted)."""
    hist = np.zeros(N_KEYS, dtype=np.float64)
    if weights.size == 0:
        for e in range(keys.size):
            hist[keys[e]] += 1.0
    else:
        for e in range(keys.size):
            hist[keys[e]] += weights[e]
    n = 0
    for k in range(N_KEYS):
        if hist[k] > 0.0:
            n += 1
    xs = np.empty(n, dtype=np.float64)
    ws = np.empty(n, dtype=np.float64)
    n = 0
    for k in range(N_KEYS):
        if hist[k] > 0.0:
            xs[n] = key_values[k]
            ws[n] = hist[k]
            n += 1
    return xs, ws


@nb.njit(cache=True, error_model="numpy")
def _cost(p0, p1, p2, i, j):
    """Weighted sum of squared deviations of values i..j (inclusive) from their mean."""
    s0 = p0[j + 1] - p0[i]
    if s0 <= 0.0:
        return 0.0
    s1 = p1[j + 1] - p1[i]
    c = (p2[j + 1] - p2[i]) - s1 * s1 / s0
    return c if c > 0.0 else 0.0


# Knuth's bounds start[k-1][j] <= start[k][j] <= start[k][j+1] leave about n / k^2 candidates
# per end: from k^2 * ratio >= n a layer is one Knuth sweep (fewest steps per end), below that
# divide and conquer (~log n per end) with Knuth sweeps for its short runs.
KNUTH_RATIO = 4
SWEEP_RUN = 16  # divide and conquer hands runs of fewer ends than this to a Knuth sweep

# error_model="numpy": IEEE division without Python's zero check, whose branch would keep LLVM
# from vectorising the candidate loops (same results; a divisor here is never zero).


@nb.njit(cache=True, error_model="numpy", inline="always")
def _best_start(mid, lo, hi, p0, p1, p2, prev, buf):
    """min over i in [lo, hi] of prev[i-1] + cost(i, mid): (cost, smallest argmin)."""
    s0 = p0[mid + 1]
    s1 = p1[mid + 1]
    s2 = p2[mid + 1]
    for i in range(lo, hi + 1):  # branch-free, so that LLVM vectorises it
        a0 = s0 - p0[i]
        a1 = s1 - p1[i]
        buf[i - lo] = prev[i - 1] + (s2 - p2[i]) - a1 * a1 / a0
    best = np.inf
    arg = lo
    for i in range(hi - lo + 1):
        if buf[i] < best:
            best = buf[i]
            arg = lo + i
    return best, arg


@nb.njit(cache=True, error_model="numpy")
def _layer_knuth(k, jlo, jhi, ilo, ihi, p0, p1, p2, prev, cur, starts):
    """Ends jlo..jhi of layer k, starts within [ilo, ihi], by Knuth's bounds
    start[k-1][j] <= start[k][j] <= start[k][j+1]: ends from right to left, a handful of
    candidates each where the argmin moves with the end."""
    upper = ihi
    for j in range(jhi, jlo - 1, -1):
        s0 = p0[j + 1]
        s1 = p1[j + 1]
        s2 = p2[j + 1]
        best = np.inf
        arg = upper
        for i in range(max(starts[k - 1, j], ilo), min(upper, j) + 1):
            a0 = s0 - p0[i]
            a1 = s1 - p1[i]
            c = prev[i - 1] + (s2 - p2[i]) - a1 * a1 / a0
            if c < best:
                best = c
                arg = i
        cur[j] = best
        starts[k, j] = arg
        upper = arg


@nb.njit(cache=True, error_model="numpy")
def _layer_split(k, jlo, jhi, ilo, ihi, p0, p1, p2, prev, cur, starts, buf, stack):
    """Ends jlo..jhi of layer k, starts within [ilo, ihi], by divide and conquer on the monotone
    argmin within the previous layer's bound; short runs of ends go to a Knuth sweep within the
    node's bounds (tighter than the previous layer's alone where the argmin barely moves, as in
    the cluster around zero, which spans thousands of tiny fp16 values)."""
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = jlo, jhi, ilo, ihi
    top = 1
    while top > 0:
        top -= 1
        jlo, jhi, ilo, ihi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
        if jlo > jhi:
            continue
        if ilo == ihi:  # the argmin is pinned: every end of the run starts its cluster there
            for j in range(jlo, jhi + 1):
                a0 = p0[j + 1] - p0[ilo]
                a1 = p1[j + 1] - p1[ilo]
                cur[j] = prev[ilo - 1] + (p2[j + 1] - p2[ilo]) - a1 * a1 / a0
                starts[k, j] = ilo
            continue
        if jhi - jlo < SWEEP_RUN:
            _layer_knuth(k, jlo, jhi, ilo, ihi, p0, p1, p2, prev, cur, starts)
            continue
        mid = (jlo + jhi) // 2
        lo = max(ilo, starts[k - 1, mid])
        best, arg = _best_start(mid, lo, min(mid, ihi), p0, p1, p2, prev, buf)
        cur[mid] = best
        starts[k, mid] = arg
        stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = jlo, mid - 1, ilo, arg
        stack[top + 1, 0], stack[top + 1, 1] = mid + 1, jhi
        stack[top + 1, 2], stack[top + 1, 3] = arg, ihi
        top += 2


@nb.njit(cache=True, error_model="numpy")
def _pivot(k, p0, p1, p2, rows, starts, buf) -> int:
    """Start layer k (row k & 1 of `rows`; row (k-1) & 1 holds layer k-1): solve its middle end
    over all its candidates and return it. That end's start bounds the ends on either side,
    which are then two independent halves."""
    prev, cur = rows[(k - 1) & 1], rows[k & 1]
    cur[:] = np.inf
    n = cur.size
    mid = (k + n - 1) // 2
    best, arg = _best_start(mid, max(k, starts[k - 1, mid]), mid, p0, p1, p2, prev, buf)
    cur[mid] = best
    starts[k, mid] = arg
    return mid


@nb.njit(cache=True, error_model="numpy")
def _half(k, h, mid, p0, p1, p2, rows, starts, buf, stack):
    """Half h of layer k around its solved middle end: h = 0 the ends left of it, 1 the right."""
    prev, cur = rows[(k - 1) & 1], rows[k & 1]
    n = cur.size
    arg = starts[k, mid]
    jlo, jhi, ilo, ihi = (k, mid - 1, k, arg) if h == 0 else (mid + 1, n - 1, arg, n - 1)
    if k * k * KNUTH_RATIO >= n:
        _layer_knuth(k, jlo, jhi, ilo, ihi, p0, p1, p2, prev, cur, starts)
    else:
        _layer_split(k, jlo, jhi, ilo, ihi, p0, p1, p2, prev, cur, starts, buf, stack)


@nb.njit(cache=True, error_model="numpy")
def _layers(p0, p1, p2, rows, starts, costs, bufs, stacks):
    """Layers 1 .. starts.shape[0] - 1 of the DP; of the last, only the end of the range (the
    only end any later step reads)."""
    last = starts.shape[0] - 1
    n = rows.shape[1]
    for k in range(1, last + 1):
        if k == last:
            best, arg = _best_start(n - 1, max(k, starts[k - 1, n - 1]), n - 1, p0, p1, p2,
                                    rows[(k - 1) & 1], bufs[0])
            costs[k] = best
            starts[k, n - 1] = arg
            break
        mid = _pivot(k, p0, p1, p2, rows, starts, bufs[0])
        for h in range(2):
            _half(k, h, mid, p0, p1, p2, rows, starts, bufs[h], stacks[h])
        costs[k] = rows[k & 1, -1]


@nb.njit(cache=True)
def _prefix_sums(xs: np.ndarray, ws: np.ndarray):
    """Prefix sums of weight, weight * x and weight * x^2 (x centred: well conditioned)."""
    n = xs.size
    shift = np.sum(xs * ws) / np.sum(ws)
    p0 = np.zeros(n + 1)
    p1 = np.zeros(n + 1)
    p2 = np.zeros(n + 1)
    for t in range(n):
        x = xs[t] - shift
        p0[t + 1] = p0[t] + ws[t]
        p1[t + 1] = p1[t] + ws[t] * x
        p2[t + 1] = p2[t] + ws[t] * x * x
    return p0, p1, p2, shift


@nb.njit(cache=True, error_model="numpy")
def _layered(p0, p1, p2, kk: int):
    """Layers 1..kk of the DP: (costs[k-1] for k = 1..kk, starts[k-1][j] = start of the last of
    k clusters of values 0..j; for k = kk only at j = n - 1)."""
    n = p0.size - 1
    starts = np.zeros((kk, n), dtype=np.int32)
    rows = np.empty((2, n))  # layers k-1 and k, alternately
    for j in range(n):
        rows[0, j] = _cost(p0, p1, p2, 0, j)
    costs = np.zeros(kk)
    costs[0] = rows[0, n - 1]
    bufs = np.empty((2, n))
    stacks = np.empty((2, 64, 4), dtype=np.int64)
    _layers(p0, p1, p2, rows, starts, costs, bufs, stacks)
    return costs, starts


@nb.njit(cache=True, error_model="numpy", inline="always")
def _ending(G, p0, p1, p2, i, e):
    """G[i] plus the cost of one cluster of values i..e-1."""
    a0 = p0[e] - p0[i]
    a1 = p1[e] - p1[i]
    return G[i] + (p2[e] - p2[i]) - a1 * a1 / a0


@nb.njit(cache=True, error_model="numpy", inline="always")
def _beats(p0, p1, c, b, offset, e) -> bool:
    """Whether a last cluster starting at c is better than one starting at b < c for the end e,
    given offset = G[c] - G[b] + p2[b] - p2[c]: h(c, e) - h(b, e) = offset + A(b) - A(c) with
    A(i) = (p1[e] - p1[i])^2 / (p0[e] - p0[i]), compared multiplied out (no division on the
    binary search's critical path)."""
    a0b = p0[e] - p0[b]
    a0c = p0[e] - p0[c]
    a1b = p1[e] - p1[b]
    a1c = p1[e] - p1[c]
    return offset * a0b * a0c + a1b * a1b * a0c - a1c * a1c * a0b < 0.0


@nb.njit(cache=True, error_model="numpy")
def _penalized(p0, p1, p2, lam, G, arg, count, cand, first) -> int:
    """min over partitions of cost + lam * clusters, for every prefix (G[e]: values 0..e-1);
    arg[e] is the start of the prefix's last cluster. Returns the whole range's cluster count.

    The cost is Monge, so once a later start beats an earlier one at some end it does at every
    later end: a deque of candidate starts, each owning the ends from first[t] on, with one
    binary search per start that takes over (Galil and Park). O(n log n), independent of k."""
    n = p0.size - 1
    G[0] = 0.0
    count[0] = 0
    head, tail = 0, 1
    cand[0], first[0] = 0, 1
    span = n
    for e in range(1, n + 1):
        while tail - head > 1 and first[head + 1] <= e:
            head += 1
        i = cand[head]
        G[e] = _ending(G, p0, p1, p2, i, e) + lam
        arg[e] = i
        count[e] = count[i] + 1
        if e == n:
            break
        c = e  # a cluster starting at value e: a candidate for ends e + 1 on
        while tail > head:  # drop candidates that c beats from their first end on
            b = cand[tail - 1]
            if _beats(p0, p1, c, b, G[c] - G[b] + p2[b] - p2[c], max(first[tail - 1], e + 1)):
                tail -= 1
            else:
                break
        if tail == head:
            cand[tail], first[tail] = c, e + 1
            tail += 1
            continue
        b = cand[tail - 1]
        offset = G[c] - G[b] + p2[b] - p2[c]
        lo = max(first[tail - 1], e + 1)  # c does not beat b here
        start = lo
        guess = lo + 2 * span  # takeovers come at similar distances: try twice the last one first
        hi = n
        if guess < n:
            if _beats(p0, p1, c, b, offset, guess):
                hi = guess
            else:
                lo = guess
        if hi == n and not _beats(p0, p1, c, b, offset, n):
            continue  # c never beats b
        while hi - lo > 1:  # c beats b at hi, not at lo
            mid = (lo + hi) // 2
            if _beats(p0, p1, c, b, offset, mid):
                hi = mid
            else:
                lo = mid
        span = max(1, hi - start)
        cand[tail], first[tail] = c, hi
        tail += 1
    return count[n]


LAGRANGE_FROM = 3  # LUTs of 3+ entries come from the penalised DP (fewer steps than layers)
LAGRANGE_ITERATIONS = 40


@nb.njit(cache=True, error_model="numpy")
def _lagrange(p0, p1, p2, k: int, lam: float, G, arg, count, cand, first) -> float:
    """Optimal k-partition by Lagrangian relaxation: search the price per cluster `lam` at which
    the penalised optimum has exactly k clusters; that partition is then optimal among all
    k-partitions (its cost plus lam * k is minimal among all partitions). `lam` is the first
    guess. The optimal cost is convex in k, so the count falls as the price rises; the search
    steps along the local power law count ~ price^(-1/beta) (beta ~ 3: cost ~ 1 / k^2), beta
    measured from the last two passes, within the bracket found so far. Returns the price, or -1
    when no price gives exactly k (cost linear across k: the caller falls back to the layered DP)."""
    lo, hi = 0.0, np.inf  # prices known to give more / fewer than k clusters
    beta = 3.0
    last_lam, last_c = 0.0, 0
    for _ in range(LAGRANGE_ITERATIONS):
        c = _penalized(p0, p1, p2, lam, G, arg, count, cand, first)
        if c == k:
            return lam
        if c > k:
            lo = lam
        else:
            hi = lam
        if hi <= lo * (1.0 + 1e-12):
            return -1.0
        if last_c and abs(last_c - c) >= 4:  # closer counts: too coarse to measure beta
            beta = min(6.0, max(1.0, np.log(lam / last_lam) / np.log(last_c / c)))
        last_lam, last_c = lam, c
        step = lam * (c / k) ** beta
        if lo > 0.0 and hi < np.inf and not lo < step < hi:
            step = np.sqrt(lo * hi)
        lam = step
    return -1.0


@nb.njit(cache=True, error_model="numpy")
def _solve(xs: np.ndarray, ws: np.ndarray, ks: np.ndarray):
    """Optimal k-means of weighted sorted values for each k in ks (ascending).

    Returns (costs[r], centroids[r, :ks[r]]): ascending centroids of the optimal ks[r]-partition,
    padded by repeating the last one when there are fewer distinct values than clusters. Small k
    come from the layered DP (every k up to the largest below LAGRANGE_FROM in one pass), larger
    k each from a Lagrangian search, whose every step costs the same whatever k is.
    """
    n = xs.size
    p0, p1, p2, shift = _prefix_sums(xs, ws)
    costs = np.zeros(ks.size)
    centroids = np.empty((ks.size, ks[-1]))
    layered_k = min(2, n)  # 2 clusters cost one O(n) scan, and a first guess of the price
    for r in range(ks.size):
        if ks[r] < LAGRANGE_FROM or ks[r] >= n:
            layered_k = max(layered_k, min(ks[r], n))
    layer_costs, starts = _layered(p0, p1, p2, layered_k)
    # the price of the first search from cost ~ 1 / k^2 (price = -dcost/dk), then from the last
    price, price_k = 2.0 * layer_costs[layered_k - 1] * layered_k**2, 1.0
    fallback_k = 0
    G = np.empty(n + 1)
    arg, count, cand, first = np.empty((4, n + 1), dtype=np.int64)
    for r in range(ks.size):
        k = min(ks[r], n)
        if k <= layered_k:
            continue
        lam = _lagrange(p0, p1, p2, k, price * (price_k / k) ** 3, G, arg, count, cand, first)
        if lam < 0:
            fallback_k = k
            continue
        price, price_k = lam, k
        e, t, total = n, k - 1, 0.0
        while e > 0:
            i = arg[e]
            total += _cost(p0, p1, p2, i, e - 1)
            centroids[r, t] = (p1[e] - p1[i]) / (p0[e] - p0[i]) + shift
            e, t = i, t - 1
        costs[r] = total
    if fallback_k:  # no price gave one of the counts: the layered DP up to it
        layered_k = fallback_k
        layer_costs, starts = _layered(p0, p1, p2, layered_k)
    for r in range(ks.size):
        m = min(ks[r], n)
        if m > layered_k:  # (after a fallback: every k up to it, the same optimum)
            continue
        costs[r] = layer_costs[m - 1]
        j = n - 1
        for layer in range(m - 1, -1, -1):
            i = starts[layer, j] if layer > 0 else 0
            centroids[r, layer] = (p1[j + 1] - p1[i]) / (p0[j + 1] - p0[i]) + shift
            j = i - 1
    for r in range(ks.size):
        m = min(ks[r], n)
        for t in range(m, ks[r]):
            centroids[r, t] = centroids[r, m - 1]
    return costs, centroids


@nb.njit(parallel=True, cache=True)
def fit_segments(
    keys: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    weights: np.ndarray,
    ks: np.ndarray,
    key_values: np.ndarray,
):
    """Exact k-means of every segment keys[starts[s]:ends[s]] for each cluster count in ks.

    Segments are the groups of one or of many weights, so that one call keeps both cores busy
    whether a layer has one group or hundreds. `weights` is aligned with `keys`, or empty for
    plain counts; ks ascending. Returns (costs[s, r], centroids[s, r, :ks[r]] ascending, float64
    before rounding to fp16) for the cluster counts ks[r].
    """
    n_seg = starts.size
    costs = np.zeros((n_seg, ks.size))
    centroids = np.zeros((n_seg, ks.size, ks[-1]))
    for s in nb.prange(n_seg):
        a, b = starts[s], ends[s]
        w = weights[a:b] if weights.size else np.empty(0)
        xs, ws = _histogram(keys[a:b], w, key_values)
        costs[s], centroids[s] = _solve(xs, ws, ks)
    return costs, centroids


@nb.njit(cache=True)
def every_cost(keys: np.ndarray, weights: np.ndarray, kmax: int, key_values: np.ndarray) -> np.ndarray:
    """Optimal cost of every cluster count 1..kmax (exact from the number of distinct values on)
    of one segment, from one pass of the layered DP."""
    xs, ws = _histogram(keys, weights, key_values)
    p0, p1, p2, _ = _prefix_sums(xs, ws)
    costs = np.zeros(kmax)
    layer_costs, _ = _layered(p0, p1, p2, min(kmax, xs.size))
    costs[: layer_costs.size] = layer_costs
    return costs


ASSIGN_CHUNK = 1 << 20  # elements per parallel task: a lone large segment still uses every core


@nb.njit(cache=True, inline="always")
def _nearest(lut: np.ndarray, lo: int, x: float) -> int:
    """Index of the LUT entry nearest x (ties to the lower index), given lo = first entry >= x."""
    if lo == lut.size:
        return lut.size - 1
    if lo == 0:
        return 0
    below = lo - 1
    while below > 0 and lut[below - 1] == lut[below]:
        below -= 1  # first of equal entries
    return below if x - lut[below] <= lut[lo] - x else lo


@nb.njit(parallel=True, cache=True)
def assign_segments(
    keys: np.ndarray, starts: np.ndarray, ends: np.ndarray, luts: np.ndarray, key_values: np.ndarray
) -> np.ndarray:
    """Index of the nearest LUT entry (ties to the lower index) for every element of every
    segment keys[starts[s]:ends[s]] (others are left unset); `luts` is segments x entries,
    ascending float64 values of the fp16 LUT.

    Work is split in chunks of every segment. A chunk of at least N_KEYS / 16 elements first
    tabulates every key in one merge of the keys (in value order) with the LUT, then gathers; a
    smaller one looks keys up as they come (binary search, memoised).
    """
    n_seg = starts.size
    n_entries = luts.shape[1]
    first = np.zeros(n_seg + 1, dtype=np.int64)  # first task of each segment
    for s in range(n_seg):
        first[s + 1] = first[s] + max(1, (ends[s] - starts[s] + ASSIGN_CHUNK - 1) // ASSIGN_CHUNK)
    out = np.empty(keys.size, dtype=np.uint8)
    for task in nb.prange(first[n_seg]):
        s = np.searchsorted(first, task, side="right") - 1
        a = starts[s] + (task - first[s]) * ASSIGN_CHUNK
        b = min(a + ASSIGN_CHUNK, ends[s])
        lut = luts[s]
        table = np.empty(N_KEYS, dtype=np.uint8)
        if b - a >= N_KEYS // 16:
            lo = 0
            for key in range(N_KEYS):  # key order is value order (NaN patterns at the ends: unused)
                x = key_values[key]
                while lo < n_entries and lut[lo] < x:
                    lo += 1
                table[key] = _nearest(lut, lo, x)
            for e in range(a, b):
                out[e] = table[keys[e]]
            continue
        known = np.zeros(N_KEYS, dtype=np.bool_)
        for e in range(a, b):
            key = keys[e]
            if not known[key]:
                x = key_values[key]
                lo, hi = 0, n_entries  # first entry >= x
                while lo < hi:
                    mid = (lo + hi) // 2
                    if lut[mid] < x:
                        lo = mid + 1
                    else:
                        hi = mid
                table[key] = _nearest(lut, lo, x)
                known[key] = True
            out[e] = table[key]
    return out
