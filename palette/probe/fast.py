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

from ..cluster import Palette, fit_palettes_batch
from ..recipe import batches
from ..spec import PaletteSpec
from .passes import run_passes
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


def probe_streamed(model, targets, units, cand, ok_specs, store, n_probes, seed, importance, progress):
    """Fast probe, palettes first: fit every candidate, then one forward and `n_probes` backward
    passes fold each layer's per-sample gradients into <g, dW> for all its candidates at once.
    Memory: the model, activations, and per layer its candidates in compact form (per (group,
    value) pair for scalar palettes); no gradient is kept. The cache keeps fitted chunks."""
    todo = [n for n in targets if store.get(n) is None]
    passes = store.load_tensors("passes.pt")
    if importance and passes is not None and passes["importance"] is None:
        todo = list(targets)
    errors = {n: store.get(n) for n in targets if n not in todo}
    cluster_s = 0.0
    if todo or passes is None:
        folds: dict[str, Streamed] = {}
        bar = tqdm(total=len(todo), desc="fit palettes", disable=not progress, leave=False)
        for i, chunk in enumerate(batches(todo, [targets[n].weight.numel() for n in todo], CHUNK_NUMEL)):
            cached = store.load_tensors(f"fit-{i}.pt")
            if cached is None or list(cached) != chunk:
                fitted, secs = _fit(targets, chunk, ok_specs, seed)
                cluster_s += secs
                cached = {n: Streamed(targets[n].weight, pals) for n, pals in zip(chunk, fitted)}
                del fitted
                store.save_tensors(f"fit-{i}.pt", cached)
            folds.update(cached)
            bar.update(len(chunk))
        bar.close()
        folded, peak, size, imp = run_passes(
            model, {n: targets[n] for n in todo}, units, folds, n_probes, seed, importance, progress
        )
        passes = {"peak": peak, "size": size, "importance": imp}
        store.save_tensors("passes.pt", passes)
        for n in todo:
            (z,), sample = folded[n]
            e = fold_probes(z, sample, n_probes, len(peak)) / size[:, None]
            errors[n] = _errors(cand, ok_specs[n], iter(e.T), len(peak))
            store.add(n, errors[n])
    return (
        {n: errors[n] for n in targets}, passes["peak"], passes["size"], passes["importance"], None, cluster_s
    )


def probe_sketched(model, targets, units, cand, ok_specs, store, n_probes, seed, importance, progress):
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
        folded, peak, size, imp = run_passes(model, targets, units, folds, n_probes, seed, importance, progress)
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
