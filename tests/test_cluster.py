"""The clustering core: optimality, parity with coremltools, layouts, determinism, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.coreml_reference import coreml_palettize
from palette import NBITS, PaletteSpec, fit_palette, fit_palettes, optimal_costs


def brute_force_cost(values: np.ndarray, weights: np.ndarray, k: int) -> float:
    """Optimal k-partition cost by trying every set of cut points of the sorted values."""
    order = np.argsort(values, kind="stable")
    x, w = values[order], weights[order]
    n = len(x)
    if k >= len(np.unique(x)):
        return 0.0
    best = np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        cost = 0.0
        for a, b in zip(bounds, bounds[1:]):
            mean = np.sum(w[a:b] * x[a:b]) / np.sum(w[a:b])
            cost += np.sum(w[a:b] * (x[a:b] - mean) ** 2)
        best = min(best, cost)
    return best


def mse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - ref.astype(np.float64)) ** 2))


def heavy_tailed(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.standard_t(5, size=shape) * 0.02).astype(np.float16))


@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = (rng.standard_t(3, size=11)).astype(np.float16)
    costs = optimal_costs(torch.from_numpy(values), 5)
    for k in range(1, 6):
        ref = brute_force_cost(values.astype(np.float64), np.ones(11), k)
        assert costs[k - 1] == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_weighted_dp_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    values = rng.normal(size=10).astype(np.float16)
    importance = rng.exponential(size=10)
    costs = optimal_costs(torch.from_numpy(values), 4, torch.from_numpy(importance))
    for k in range(1, 5):
        ref = brute_force_cost(values.astype(np.float64), importance, k)
        assert costs[k - 1] == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_weighted_palette_favours_important_weights() -> None:
    w = heavy_tailed((32, 64), seed=3)
    imp = torch.ones(w.shape, dtype=torch.float64)
    imp[:4] = 1000.0  # the first four channels matter most
    spec = PaletteSpec(nbits=2)
    plain = fit_palette(w, spec).dequantize().float()
    weighted = fit_palette(w, spec, importance=imp).dequantize().float()
    err = lambda d: float(((d - w.float())[:4] ** 2).mean())  # noqa: E731
    assert err(weighted) < err(plain)


def test_costs_of_every_cluster_count_from_one_pass_are_decreasing() -> None:
    costs = optimal_costs(heavy_tailed((64, 300)), 256)
    assert costs.shape == (256,)
    assert np.all(np.diff(costs) <= 1e-15)
    assert costs[0] > costs[255] >= 0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.sampled_from([4, 8, 16]),
    cols=st.integers(1, 40),
    nbits=st.sampled_from(NBITS),
)
def test_properties_index_range_lut_order_and_never_worse_than_coremltools(
    seed: int, rows: int, cols: int, nbits: int
) -> None:
    w = heavy_tailed((rows, cols), seed)
    pal = fit_palette(w, PaletteSpec(nbits=nbits))
    assert pal.lut.dtype == torch.float16 and pal.indices.dtype == torch.uint8
    assert pal.lut.shape == (1, 1 << nbits, 1)
    assert int(pal.indices.max()) < (1 << nbits)
    assert bool((pal.lut.flatten().diff() >= 0).all()), "LUT must be ascending"
    ours = mse(pal.dequantize().numpy(), w.numpy())
    theirs = mse(coreml_palettize(w.numpy(), nbits), w.numpy())
    # Our partition is the optimum before its centroids are rounded to fp16; rounding adds at most
    # (half an fp16 ULP)^2 per element, so another partition can win by no more than that.
    half_ulp = float(np.spacing(np.abs(w.numpy()).max())) / 2
    assert ours <= theirs + half_ulp**2


@pytest.mark.parametrize("nbits", [2, 4, 6, 8])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_grouped_channel"])
def test_parity_with_coremltools_where_it_is_exact(nbits: int, granularity: str) -> None:
    """fp16 groups of >= 10,000 elements: coremltools uses the exact kmeans1d; we must match."""
    w = heavy_tailed((32, 1280), seed=nbits)  # groups of 16 x 1280 = 20,480 elements
    gs = 16 if granularity == "per_grouped_channel" else None
    ours = mse(fit_palette(w, PaletteSpec(nbits, granularity, gs)).dequantize().numpy(), w.numpy())
    theirs = mse(coreml_palettize(w.numpy(), nbits, granularity, 16), w.numpy())
    assert ours <= theirs * (1 + 1e-9)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_strictly_better_where_coremltools_falls_back_to_sklearn() -> None:
    w = heavy_tailed((32, 150), seed=0)  # 4,800 elements: coremltools uses sklearn's k-means
    for nbits in (2, 3, 4):
        ours = mse(fit_palette(w, PaletteSpec(nbits)).dequantize().numpy(), w.numpy())
        theirs = mse(coreml_palettize(w.numpy(), nbits), w.numpy())
        assert ours < theirs * (1 - 1e-3), (nbits, ours, theirs)


def test_few_distinct_values_are_exact() -> None:
    vals = torch.tensor([-0.5, 0.25, 0.125, 1.0, -0.5, 0.0], dtype=torch.float16)
    w = vals[torch.randint(0, 6, (16, 12), generator=torch.Generator().manual_seed(0))]
    w[0, 0] = -0.0  # -0 and +0 are one value
    for nbits in (3, 4, 8):
        assert torch.equal(fit_palette(w, PaletteSpec(nbits)).dequantize(), w)


def test_one_pass_for_many_specs_equals_separate_fits() -> None:
    w = heavy_tailed((32, 96), seed=7)
    specs = [PaletteSpec(b) for b in NBITS] + [
        PaletteSpec(4, "per_grouped_channel", 8),
        PaletteSpec(3, "per_grouped_channel", 8, per_channel_scale=True),
    ]
    together = fit_palettes(w, specs)
    for spec, pal in zip(specs, together):
        alone = fit_palette(w, spec)
        assert torch.equal(pal.lut, alone.lut) and torch.equal(pal.indices, alone.indices)


def test_grouped_layout_and_size() -> None:
    w = heavy_tailed((48, 10, 3, 3), seed=1)
    spec = PaletteSpec(4, "per_grouped_channel", 16)
    pal = fit_palette(w, spec)
    assert pal.lut.shape == (3, 16, 1)
    assert pal.indices.shape == (48, 10, 3, 3)
    assert pal.shape == (48, 10, 3, 3)
    assert pal.nbytes == 48 * 90 * 4 // 8 + 3 * 16 * 2
    # each group of 16 output channels uses its own LUT only
    for g in range(3):
        rows = pal.dequantize()[g * 16 : (g + 1) * 16]
        assert set(rows.flatten().tolist()) <= set(pal.lut[g].flatten().tolist())


def test_per_channel_scale_normalises_each_output_channel() -> None:
    w = heavy_tailed((16, 64), seed=2)
    w[3] *= 40  # one loud channel
    pal = fit_palette(w, PaletteSpec(3, per_channel_scale=True))
    expected_scale = w.abs().amax(dim=1)
    assert torch.equal(pal.scale, expected_scale)
    plain = fit_palette(w, PaletteSpec(3))
    quiet = [i for i in range(16) if i != 3]
    err = lambda p: float(((p.dequantize().float() - w.float())[quiet] ** 2).mean())  # noqa: E731
    assert err(pal) < err(plain)
    assert pal.nbytes == 16 * 64 * 3 // 8 + 8 * 2 + 16 * 2


@pytest.mark.parametrize("cluster_dim", [2, 4])
def test_vector_palettes_are_deterministic_and_well_formed(cluster_dim: int) -> None:
    w = heavy_tailed((32, 40), seed=4)
    spec = PaletteSpec(4, "per_grouped_channel", 16, cluster_dim=cluster_dim)
    a = fit_palette(w, spec, seed=5)
    b = fit_palette(w, spec, seed=5)
    assert torch.equal(a.lut, b.lut) and torch.equal(a.indices, b.indices)
    assert a.lut.shape == (2, 16, cluster_dim)
    assert a.indices.shape == (32 // cluster_dim, 40)
    dense = a.dequantize()
    # a vector covers cluster_dim consecutive output channels at one position
    g = 1
    r, col = (16 // cluster_dim) + 1, 7
    entry = a.lut[g, a.indices[r, col].long()]
    assert torch.equal(dense[r * cluster_dim : (r + 1) * cluster_dim, col], entry)
    scalar_err = mse(fit_palette(w, PaletteSpec(2, "per_grouped_channel", 16)).dequantize().numpy(), w.numpy())
    assert mse(dense.numpy(), w.numpy()) < 4 * scalar_err  # a real clustering, not noise
    assert a.nbytes == (32 * 40 // cluster_dim) * 4 // 8 + 2 * 16 * cluster_dim * 2


def test_deterministic_bytes() -> None:
    w = heavy_tailed((64, 64), seed=9)
    specs = [PaletteSpec(b, "per_grouped_channel", 16) for b in (2, 4, 8)]
    a, b = fit_palettes(w, specs), fit_palettes(w.clone(), specs)
    for x, y in zip(a, b):
        assert x.lut.numpy().tobytes() == y.lut.numpy().tobytes()
        assert x.indices.numpy().tobytes() == y.indices.numpy().tobytes()


@pytest.mark.parametrize(
    "weight, spec, message",
    [
        (torch.ones(4, 4, dtype=torch.int32), PaletteSpec(), "not a float type"),
        (torch.ones(4, 4, dtype=torch.bool), PaletteSpec(), "not a float type"),
        (torch.tensor([[1.0, float("nan")]]), PaletteSpec(), "NaN/Inf"),
        (torch.tensor([[1.0, float("inf")]]), PaletteSpec(), "NaN/Inf"),
        (torch.tensor([[1.0, 1e6]]), PaletteSpec(), "fp16 range"),
        (torch.empty(0, 4), PaletteSpec(), "empty"),
        (torch.ones(20, 4), PaletteSpec(4, "per_grouped_channel", 16), "does not divide"),
    ],
)
def test_bad_input_names_the_problem_and_the_layer(weight, spec, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        fit_palette(weight, spec, name="down.0.conv")
    assert "down.0.conv" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nbits": 5}, "nbits must be one of"),
        ({"nbits": True}, "nbits must be one of"),
        ({"granularity": "per_channel"}, "granularity must be one of"),
        ({"cluster_dim": 3}, "cluster_dim must be one of"),
        ({"group_size": 8}, "applies to granularity='per_grouped_channel' only"),
        ({"granularity": "per_grouped_channel", "group_size": 0}, "positive int"),
        ({"granularity": "per_grouped_channel", "group_size": 6, "cluster_dim": 4}, "multiple of"),
    ],
)
def test_spec_validation(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        PaletteSpec(**kwargs)


def test_spec_round_trip_and_defaults() -> None:
    spec = PaletteSpec(3, "per_grouped_channel", cluster_dim=2, per_channel_scale=True)
    assert spec.group_size == 16
    assert PaletteSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown PaletteSpec field"):
        PaletteSpec.from_dict({"nbits": 4, "bits": 3})


def test_a_segment_alone_or_among_others_gives_the_same_bits() -> None:
    """A segment's result does not depend on the segments (and threads) it shares a call with."""
    from palette import _exact1d

    keys = _exact1d.fp16_keys(heavy_tailed((64, 1024), seed=11).numpy().reshape(-1).view(np.uint16))
    ks = np.array([2, 16, 256])
    fit = lambda starts: _exact1d.fit_segments(  # noqa: E731
        keys, np.array(starts), np.array([keys.size] * len(starts)), np.empty(0), ks, _exact1d.KEY_VALUES
    )
    lone, pair = fit([0]), fit([0, 0])
    (cost, cen), (costs2, cen2) = lone, pair
    assert np.array_equal(cost[0], costs2[0]) and np.array_equal(cost[0], costs2[1])
    for r, k in enumerate(ks):
        assert np.array_equal(cen[0, r, :k], cen2[0, r, :k]) and np.array_equal(cen[0, r, :k], cen2[1, r, :k])


def test_assignment_is_the_nearest_entry_in_every_path() -> None:
    """Chunks of a segment larger than one task, tabulated and memoised lookups: all give the
    nearest entry, ties (equal entries, midpoints) to the lower index."""
    from palette import _exact1d

    w = heavy_tailed((3, _exact1d.ASSIGN_CHUNK // 2 + 7), seed=12).numpy().reshape(-1)
    keys = _exact1d.fp16_keys(w.view(np.uint16))
    lut = np.quantile(w.astype(np.float64), np.linspace(0, 1, 16)).astype(np.float16).astype(np.float64)
    lut[5] = lut[4]
    starts = np.array([0, w.size - 3000, w.size - 1000])  # one beyond a chunk, two small ones
    ends = np.append(starts[1:], w.size)
    idx = _exact1d.assign_segments(keys, starts, ends, np.repeat(lut[None], 3, 0), _exact1d.KEY_VALUES)
    dist = np.abs(w.astype(np.float64)[:, None] - lut[None])
    assert np.array_equal(idx, dist.argmin(axis=1))  # argmin: ties to the lower index


def reference_dp_costs(values: np.ndarray, weights: np.ndarray, kmax: int) -> np.ndarray:
    """Optimal costs for k = 1..kmax by the plain O(k n^2) DP over the distinct values."""
    x, inv = np.unique(values, return_inverse=True)
    w = np.bincount(inv, weights=weights)
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(w * x**e)]) for e in range(3))
    n = x.size
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # cluster i..j
    with np.errstate(divide="ignore", invalid="ignore"):
        s0 = p0[j + 1] - p0[i]
        cost = np.where(i <= j, (p2[j + 1] - p2[i]) - (p1[j + 1] - p1[i]) ** 2 / s0, np.inf)
    d = cost[0].copy()
    out = [d[-1]]
    for _ in range(1, kmax):
        d = np.min(d[:-1, None] + cost[1:], axis=0)  # d[j]: min over the last cluster's start i >= 1
        out.append(d[-1] if np.isfinite(d[-1]) else 0.0)
    return np.array(out)


@pytest.mark.parametrize("case", ["heavy_tailed", "few_values", "weighted"])
def test_dp_equals_plain_dp_on_hundreds_of_values(case: str) -> None:
    """Divide and conquer, Knuth sweeps and the split at the middle end, on inputs large enough
    to take every path, against the plain DP for every k up to 40."""
    rng = np.random.default_rng(7)
    if case == "few_values":  # heavy ties: 60 distinct values, very uneven counts
        values = rng.choice(rng.standard_normal(60), size=5000, p=rng.dirichlet(np.full(60, 0.3)))
    else:
        values = rng.standard_t(4, size=700) * 0.05
    values = values.astype(np.float16)
    importance = rng.exponential(size=values.size) if case == "weighted" else None
    w = torch.from_numpy(values)
    costs = optimal_costs(w, 40, None if importance is None else torch.from_numpy(importance))
    weights = np.ones(values.size) if importance is None else importance
    ref = reference_dp_costs(values.astype(np.float64), weights, 40)
    np.testing.assert_allclose(costs, ref, rtol=1e-9, atol=1e-12 * ref[0])


def assert_lagrangian_equals_layered(values: np.ndarray, weights: np.ndarray, ks: np.ndarray) -> None:
    """fit_segments' costs for ascending `ks` equal the layered DP's optimum (`every_cost`), and
    its centroids are that partition's: assigning the values to them costs no more."""
    from palette import _exact1d

    keys = _exact1d.fp16_keys(values.view(np.uint16))
    bounds = np.array([0]), np.array([keys.size])
    costs, centroids = _exact1d.fit_segments(keys, *bounds, weights, ks, _exact1d.KEY_VALUES)
    ref = _exact1d.every_cost(keys, weights, int(ks[-1]), _exact1d.KEY_VALUES)
    np.testing.assert_allclose(costs[0], ref[ks - 1], rtol=1e-9, atol=1e-12 * ref[0])
    w = weights if weights.size else np.ones(values.size)
    x = values.astype(np.float64)
    for r, k in enumerate(ks):
        err = np.min((x[:, None] - centroids[0, r, :k][None]) ** 2, axis=1) @ w
        assert err <= ref[k - 1] * (1 + 1e-9) + 1e-12 * ref[0]


@pytest.mark.parametrize("case", ["heavy_tailed", "few_values", "weighted", "even_grid"])
def test_lagrangian_partitions_equal_the_layered_dp(case: str) -> None:
    """Cluster counts from LAGRANGE_FROM on come from the penalised DP: the cost of the partition
    it returns equals the layered DP's optimum for every k, including an evenly spaced grid whose
    optimal cost is linear in k (no price gives those counts: the layered DP takes over)."""
    from palette import _exact1d

    rng = np.random.default_rng(8)
    if case == "few_values":
        values = rng.choice(rng.standard_normal(90), size=5000, p=rng.dirichlet(np.full(90, 0.3)))
    elif case == "even_grid":
        values = np.arange(24.0)
    else:
        values = rng.standard_t(4, size=3000) * 0.05
    weights = rng.exponential(size=values.size) if case == "weighted" else np.empty(0)
    assert_lagrangian_equals_layered(values.astype(np.float16), weights, np.arange(_exact1d.LAGRANGE_FROM, 23))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["normal", "student_t", "integer_grid", "rounded", "uniform"]),
    size=st.integers(50, 2000),
    weighted=st.booleans(),
    ks=st.lists(st.integers(3, 79), min_size=1, max_size=4, unique=True),
)
def test_lagrangian_equals_layered_on_random_inputs(seed, kind, size, weighted, ks) -> None:
    """Property form of the test above: any distribution, weights and set of LUT sizes."""
    rng = np.random.default_rng(seed)
    values = {
        "normal": lambda: rng.normal(size=size) * 0.05,
        "student_t": lambda: rng.standard_t(3, size=size) * 0.02,
        "integer_grid": lambda: rng.integers(-20, 20, size=size) * 0.01,
        "rounded": lambda: np.round(rng.normal(size=size) * 8) / 8,
        "uniform": lambda: rng.uniform(-1, 1, size=size),
    }[kind]().astype(np.float16)
    weights = rng.exponential(size=size) if weighted else np.empty(0)
    assert_lagrangian_equals_layered(values, weights, np.array(sorted(ks)))
