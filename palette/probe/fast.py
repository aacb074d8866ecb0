"""The fast estimator (first order, randomized): the output error of a weight change dW_l is
e = J_l dW_l, and ||J_l dW_l||^2 = E_v[(v^T J_l dW_l)^2] = E_v[<g_l(v), dW_l>^2] for Rademacher v in
output space, g_l(v) = d(v^T f)/dW_l. One forward and K backward passes (`passes`) give every
layer's per-sample gradients, folded at once into inner products with every candidate dW_l
(`sketch`). Cost: 1 + 2K forward-equivalents plus clustering, independent of layers x specs.

Two paths compute the same estimator. Streamed (default): every candidate palette is fitted first
and kept compact, each pass folds into <g, dW> for all of them, no gradient is stored. Sketched
(`keep_sketch`): the passes keep per-layer gradient sketches, the candidates are scored after, and
`Sensitivity.estimate` scores any other palette later (e.g. one fitted with the Fisher importance
the squared gradients give on the side).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
from tqdm.auto import tqdm

from ..cluster import Palette, fit_luts_batch, fit_palettes_batch
from ..recipe import batches
from ..spec import PaletteSpec
from .budget import release_freed
from .passes import run_passes
from .shard import Shard
from .sketch import Scorer, SketchFold, Streamed, ValueIndex, fold_probes, group_rows, is_value_function

CHUNK_NUMEL = 1 << 22  # weights of the layers clustered together in one parallel call (palettes freed after)


def _errors(cand: list[PaletteSpec], ok: list[PaletteSpec], per_spec: Iterator[np.ndarray], n_samples: int) -> np.ndarray:
    """(len(cand), n_samples) errors, NaN where a spec does not apply; `per_spec` follows `ok`."""
    err = np.full((len(cand), n_samples), np.nan)
    for spec, e in zip(ok, per_spec):
        err[cand.index(spec)] = e
    return err


def _fit(targets, chunk: list[str], ok_specs, seed: int) -> tuple[list[list[Palette]], float]:
    """Every candidate palette of a chunk of layers, in one parallel call; and its seconds."""
    t0 = time.perf_counter()
    fitted = fit_palettes_batch([(targets[n].weight.detach(), ok_specs[n], None) for n in chunk], seed=seed, names=chunk)
    return fitted, time.perf_counter() - t0


def _candidates(targets, chunk: list[str], ok_specs, seed: int) -> tuple[dict[str, Streamed], float]:
    """Every candidate of a chunk of layers in compact form (`Streamed`), from one parallel
    clustering call: only LUTs for unscaled scalar specs, whole palettes for the others."""
    t0 = time.perf_counter()
    compact = {n: [i for i, s in enumerate(ok_specs[n]) if is_value_function(s)] for n in chunk}
    luts = fit_luts_batch([(targets[n].weight.detach(), [ok_specs[n][i] for i in compact[n]]) for n in chunk],
                          names=chunk)
    rest = {n: [i for i in range(len(ok_specs[n])) if i not in compact[n]] for n in chunk}
    others = {n: [] for n in chunk}
    needs = [n for n in chunk if rest[n]]
    if needs:
        pals = fit_palettes_batch([(targets[n].weight.detach(), [ok_specs[n][i] for i in rest[n]], None) for n in needs],
                                  seed=seed, names=needs)
        others.update(zip(needs, pals))
    out = {n: Streamed(targets[n].weight, ok_specs[n], dict(zip(compact[n], lut)), dict(zip(rest[n], others[n])))
           for n, lut in zip(chunk, luts)}
    return out, time.perf_counter() - t0


def probe_streamed(model, targets, probe, cand, ok_specs, store, n_probes, seed, importance, progress, shard: Shard):
    """Fast probe, candidates first: every rank fits its share of the layers' candidates (compact:
    per group and LUT entry a threshold, nothing per weight), then runs its share of the probe
    units, one forward and `n_probes` backward passes each, folding each layer's per-sample
    gradients into <g, dW> for all its candidates at once; no gradient is kept. Memory: the model,
    one unit's activations and the compact candidates. The cache keeps the fitted chunks and every
    finished unit, so an interrupted run resumes where it stopped."""
    names = list(targets)
    chunks = list(batches(names, [targets[n].weight.numel() for n in names], CHUNK_NUMEL))
    folds: dict[str, Streamed] = {}
    cluster_s = 0.0
    bar = tqdm(total=len(names), desc="fit palettes", disable=not progress, leave=False)
    for i, chunk in shard.mine(chunks):
        cached = store.load_tensors(f"fit-{i}.pt")
        if cached is None or list(cached) != chunk:
            cached, secs = _candidates(targets, chunk, ok_specs, seed)
            cluster_s += secs
            store.save_tensors(f"fit-{i}.pt", cached)
        folds.update(cached)
        bar.update(len(chunk))
    bar.close()
    release_freed()  # the clustering's working memory
    if shard.world > 1:
        parts = shard.gather((folds, cluster_s))
        folds = {n: f for part, _ in parts for n, f in part.items()}
        cluster_s = sum(c for _, c in parts)
    mine = {}
    bar = tqdm(total=len(probe.units), desc="probe units", disable=not progress, leave=False)
    for u, unit in shard.mine(probe.units):
        done = store.load_tensors(f"unit-{u}.pt")
        if done is None:
            folded, peak, size, imp = run_passes(model, targets, [(u, unit)], folds, n_probes, seed, importance,
                                                 progress)
            errs = {}
            for n in names:
                (z,), sample = folded[n]
                errs[n] = fold_probes(z, sample, n_probes, len(peak)) / size[:, None]
            done = {"errors": errs, "peak": peak, "size": size, "importance": imp}
            store.save_tensors(f"unit-{u}.pt", done)
            release_freed()  # the unit's graph and gradients
        mine[u] = done
        bar.update(1)
    bar.close()
    results = {u: r for part in shard.gather(mine) for u, r in part.items()}
    order = [results[u] for u in range(len(probe.units))]
    peak = np.concatenate([r["peak"] for r in order])
    size = np.concatenate([r["size"] for r in order])
    errors = {n: _errors(cand, ok_specs[n], iter(np.concatenate([r["errors"][n] for r in order]).T), len(peak))
              for n in names}
    imp = None
    if importance:
        rows = [r["size"].shape[0] for r in order]
        imp = {n: sum(r["importance"][n] * k for r, k in zip(order, rows)) / sum(rows) for n in names}
    return errors, peak, size, imp, None, cluster_s


def probe_sketched(model, targets, probe, cand, ok_specs, store, n_probes, seed, importance, progress):
    """Fast probe, gradients first (`keep_sketch`): the passes keep per-layer gradient sketches
    (per-pair sums where every candidate is a scalar palette on one grouping, else the per-sample
    gradients), then every candidate is fitted and scored against them; the sketches stay for
    `Sensitivity.estimate`. The cache keeps the sketches and finished layers."""
    state = store.load_tensors("sketch.pt")
    todo = [n for n in targets if store.get(n) is None]
    if state is None or (importance and state["importance"] is None):
        folds = {}
        for n, m in targets.items():
            groupings = {group_rows(s) for s in ok_specs[n]}
            scalar = len(groupings) == 1 and all(is_value_function(s) for s in ok_specs[n])
            folds[n] = SketchFold(ValueIndex(m.weight, groupings.pop()) if scalar else None, m.weight.numel())
        folded, peak, size, imp = run_passes(model, targets, list(enumerate(probe.units)), folds, n_probes, seed,
                                             importance, progress)
        sketches = {n: folds[n].sketch(*folded[n]) for n in targets}
        state = {"sketches": sketches, "peak": peak, "size": size, "importance": imp}
        if todo:
            store.save_tensors("sketch.pt", state)
    sketches, peak, size = state["sketches"], state["peak"], state["size"]
    errors = {n: store.get(n) for n in targets if n not in todo}
    cluster_s = 0.0
    bar = tqdm(total=len(todo), desc="score layers", disable=not progress, leave=False)
    for chunk in batches(todo, [targets[n].weight.numel() for n in todo], CHUNK_NUMEL):
        fitted, secs = _fit(targets, chunk, ok_specs, seed)
        cluster_s += secs
        for name, pals in zip(chunk, fitted):
            score = Scorer(sketches[name], targets[name].weight, n_probes, len(peak))
            errors[name] = _errors(cand, ok_specs[name], (score(p) / size for p in pals), len(peak))
            store.add(name, errors[name])
            bar.update()
    bar.close()
    return {n: errors[n] for n in targets}, peak, size, state["importance"], sketches, cluster_s
