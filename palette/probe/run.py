"""`probe_sensitivity`: the output error of palettizing each target layer alone at each candidate
spec, on one probe set, against the unmodified model run in its own dtype (the "16-bit model" of
Apple's MBP; fp32 on CPU), by the fast (first-order) or the exhaustive estimator."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_loaded, integer
from ..palettize import untouched
from ..recipe import Candidates
from ..spec import PaletteSpec
from .budget import estimate
from .cache import Cache, fingerprint
from .exhaustive import probe_exhaustive
from .fast import probe_sketched, probe_streamed
from .inputs import ProbeSet, make_probe_set
from .sensitivity import METHODS, Cost, LayerInfo, Sensitivity
from .shard import Shard


PASSES_PER_PROBE = 32  # random projections over all samples when K is not given (RESULTS: accuracy vs cost)


def default_probes(n_samples: int) -> int:
    """Backward passes (random projections) per sample when none are asked: about 32 in all, at
    least 2 per sample (2 at the default 16 samples). Measured (RESULTS, accuracy against cost): at
    equal cost more samples with fewer passes each rank layers better than few samples with many
    passes (16 x 2 beats 8 x 4 on MiniLM); 32 in all rank layers at Spearman >= 0.95 (4 bits) on
    both reference models. A sample's forward is cheap next to a pass (about 3 forwards at SD
    scale), so 16 x 2 costs about what 8 x 4 does while Apple's sweep, which runs over every
    sample, costs twice as much. The uncalibrated additive prediction is noisier than with more
    passes; `allocate_bits` calibrates (measures) by default."""
    return max(2, math.ceil(PASSES_PER_PROBE / n_samples))


def applicable(spec: PaletteSpec, shape: tuple[int, ...], name: str) -> bool:
    """Whether `spec` can palettize a weight of `shape` (its group size divides the channels)."""
    try:
        spec.n_groups(shape[0], name)
        return True
    except ValueError:
        return False


def as_candidates(candidates: Candidates | Sequence[PaletteSpec] | None) -> Candidates:
    """A Candidates from None (the defaults), a Candidates, or a sequence of specs."""
    if candidates is None:
        return Candidates()
    if isinstance(candidates, Candidates):
        return candidates
    if isinstance(candidates, PaletteSpec):
        return Candidates(specs=(candidates,))
    return Candidates(specs=tuple(candidates))


def probe_sensitivity(
    model: nn.Module,
    inputs: ProbeSet | Any = None,
    candidates: Candidates | Sequence[PaletteSpec] | None = None,
    *,
    method: str = "fast",
    n_probes: int | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    importance: bool = False,
    keep_sketch: bool = False,
    progress: bool = True,
) -> Sensitivity:
    """Output error of palettizing each target layer alone at each candidate spec.

    `inputs`: a `ProbeSet` (`make_probe_set`), or what it takes: a tuple of tensors, a list of such
    tuples (or dicts of keyword tensors), a callable `model -> output`, or None to synthesise
    data-free samples seeded with `seed`. `candidates`: the layers and specs to probe (`Candidates`,
    or a list of specs). `method`: "fast" (one forward, `n_probes` backward passes per sample, first
    order; default `default_probes` of the sample count) or
    "exhaustive" (one forward per layer and spec). `importance=True` (fast) adds
    `Sensitivity.importance`: per-layer mean squared gradient of v^T f, the Gauss-Newton diagonal,
    for `fit_palettes(..., importance=...)`. `keep_sketch=True` (fast) keeps the gradient sketches
    for `Sensitivity.estimate`. `cache`: a directory; a rerun with the same arguments resumes where
    an interrupted run stopped. The model is not modified.
    """
    check_loaded(model)
    if n_probes is not None:
        n_probes = integer(n_probes, "n_probes", minimum=1)
    seed = integer(seed, "seed")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "exhaustive" and (importance or keep_sketch):
        raise ValueError("importance and keep_sketch come from gradients: use method='fast'")
    with untouched(model):
        return _probe(model, inputs, candidates, method, n_probes, seed, cache, importance, keep_sketch, progress)


def _probe(model, inputs, candidates, method, n_probes, seed, cache, importance, keep_sketch, progress) -> Sensitivity:
    t_start = time.perf_counter()
    shard = Shard.current()
    cands = as_candidates(candidates)
    cand = cands.spec_list()
    targets = cands.layers(model)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no target layers ({'/'.join(t.__name__ for t in cands.types)} "
            f"with >= {cands.min_numel} weights)"
        )
    probe = inputs if isinstance(inputs, ProbeSet) else make_probe_set(model, inputs, seed=seed)
    n_probes = default_probes(probe.samples) if n_probes is None else n_probes
    shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
    fits = {n: [applicable(s, shapes[n], n) for s in cand] for n in targets}
    n_eff = n_probes if method == "fast" else 0
    store = Cache(cache, fingerprint(targets, cand, method, seed, n_eff, probe.description), shard.rank)

    est = None
    if method == "fast":
        ok_specs = {n: [s for s, a in zip(cand, fits[n]) if a] for n in targets}
        if keep_sketch:
            if shard.world > 1:
                raise ValueError("keep_sketch (and allocate_bits(importance=True)) runs in one process; "
                                 "run it without torchrun")
            errors, peak, size, imp, sketches, cluster_s = probe_sketched(
                model, targets, probe, cand, ok_specs, store, n_probes, seed, importance, progress)
        else:
            if importance and shard.world > 1:
                raise ValueError("importance=True runs in one process; run it without torchrun")
            units = len(shard.mine(probe.units))
            est = estimate(model, probe, targets, ok_specs, n_probes, units)
            if progress:
                tqdm.write(est.summary(), file=sys.stderr)
            est.check()
            errors, peak, size, imp, sketches, cluster_s = probe_streamed(
                model, targets, probe, cand, ok_specs, store, n_probes, seed, importance, progress, shard)
        forwards, backwards = 1, n_probes
    else:
        errors, peak, size, cluster_s = probe_exhaustive(model, targets, probe, cand, fits, store, seed, progress,
                                                         shard)
        imp, sketches = None, None
        forwards, backwards = 1 + sum(sum(a) for a in fits.values()), 0

    nbytes = {n: [s.nbytes(shapes[n], n) if a else None for s, a in zip(cand, fits[n])] for n in targets}
    cost = Cost(float(forwards + 2 * backwards), forwards, backwards, time.perf_counter() - t_start, cluster_s, est)
    sens = Sensitivity(
        layers={n: LayerInfo(shapes[n], math.prod(shapes[n])) for n in targets},
        specs=cand, errors=errors, nbytes=nbytes, peak=np.asarray(peak, dtype=np.float64),
        sample_size=np.asarray(size, dtype=np.int64), method=method,
        inputs_description=probe.description, seed=seed, n_probes=n_eff, cost=cost,
        importance=imp if importance else None,
    )
    if keep_sketch:
        for n, sk in sketches.items():
            sk.weight = targets[n].weight
            sk.checksum = float(sk.weight.detach().double().sum())
        sens.sketch = sketches
    return sens
