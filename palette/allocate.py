"""Mixed-bit allocation: the spec of every layer that minimises predicted output error under a size
budget, a multiple-choice knapsack solved with a bound on how far from optimal it can be.

Each target layer may stay at 16 bits or take any probed spec; its predicted error comes from
`probe_sensitivity` (errors add across layers) and its size is exact (`PaletteSpec.nbytes`). The
solver walks the layers' lower convex hulls in order of error saved per byte (the Lagrangian /
LP-relaxation optimum, which bounds the best possible error from below), keeps every step that
fits, then spends what is left on the single-layer switch that saves the most, until none fits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .cluster import fit_palettes
from .metrics import psnr_from_mse

from .palettize import DEFAULT_MIN_NUMEL, target_layers
from .recipe import Recipe, fixed_bytes, from_mapping
from .spec import NBITS, PaletteSpec

GB = 1e9  # budgets count decimal gigabytes


@dataclass(frozen=True)
class Option:
    """One choice for one layer: a spec (None keeps 16 bits), its stored bytes, predicted error,
    and the LUT of an importance-weighted palette when that is the better palette for the spec."""

    spec: PaletteSpec | None
    nbytes: int
    error: float
    per_sample: np.ndarray | None = field(default=None, compare=False, repr=False)
    lut: torch.Tensor | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Solution:
    choice: dict[str, Option]
    error: float  # sum of the chosen options' errors
    lower_bound: float  # no choice within the capacity has a smaller total error

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.choice.values())

    @property
    def gap(self) -> float:
        """Relative distance from the bound: 0 is provably optimal."""
        return (self.error - self.lower_bound) / self.error if self.error > 0 else 0.0


def lower_hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, error), by increasing bytes."""
    pts = sorted(options, key=lambda o: (o.nbytes, o.error))
    front: list[Option] = []
    for o in pts:  # Pareto front: more bytes must buy strictly less error
        if not front or o.error < front[-1].error:
            if front and front[-1].nbytes == o.nbytes:
                front.pop()
            front.append(o)
    hull: list[Option] = []
    for o in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a-o
            if (b.error - a.error) * (o.nbytes - a.nbytes) >= (o.error - a.error) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def solve(options: Mapping[str, Sequence[Option]], capacity: int) -> Solution:
    """Multiple-choice knapsack: one option per layer, total bytes <= capacity, least total error."""
    hulls = {n: lower_hull(opts) for n, opts in options.items()}
    at = {n: 0 for n in hulls}
    used = sum(h[0].nbytes for h in hulls.values())
    if used > capacity:
        raise ValueError(f"capacity {capacity} is below the smallest total {used}")
    error = sum(h[0].error for h in hulls.values())
    steps = sorted(
        (
            ((h[i].error - h[i + 1].error) / (h[i + 1].nbytes - h[i].nbytes), n, i)
            for n, h in hulls.items()
            for i in range(len(h) - 1)
        ),
        key=lambda s: (-s[0], s[1], s[2]),
    )
    bound = None
    blocked: set[str] = set()
    for slope, n, i in steps:
        if n in blocked or at[n] != i:
            continue
        a, b = hulls[n][i], hulls[n][i + 1]
        if used + b.nbytes - a.nbytes <= capacity:
            used += b.nbytes - a.nbytes
            error += b.error - a.error
            at[n] = i + 1
        else:
            if bound is None:  # LP relaxation: the first step that does not fit, fractionally
                bound = error - slope * (capacity - used)
            blocked.add(n)
    if bound is None:
        bound = error
    choice = {n: hulls[n][i] for n, i in at.items()}
    # Spend what is left: the single-layer switch (any option, on the hull or not) saving most.
    while True:
        room = capacity - sum(o.nbytes for o in choice.values())
        best = None
        for n, opts in options.items():
            cur = choice[n]
            for o in opts:
                if o.nbytes - cur.nbytes <= room and o.error < cur.error:
                    gain = cur.error - o.error
                    if best is None or gain > best[0]:
                        best = (gain, n, o)
        if best is None:
            break
        choice[best[1]] = best[2]
    total = sum(o.error for o in choice.values())
    return Solution(choice, total, min(bound, total))


def allocate_bits(
    model: nn.Module,
    budget_gb: float | None = None,
    *,
    budget_bits: float | None = None,
    inputs: Any = None,
    sensitivity: Any = None,
    nbits: Sequence[int] = NBITS,
    granularities: Sequence[str] = ("per_tensor", "per_grouped_channel"),
    group_size: int = 16,
    method: str = "fast",
    seed: int = 0,
    min_numel: int = DEFAULT_MIN_NUMEL,
    importance: bool = False,
    max_chunk_bytes: int | None = None,
    calibrate: bool = True,
    progress: bool = True,
    **probe_kwargs: Any,
) -> Recipe:
    """The recipe with the least predicted output error whose stored size fits the budget.

    `budget_gb`: decimal GB of the whole model as stored (palettized weights, LUTs, scales, and
    every other parameter at 16 bits). `budget_bits`: average bits per target weight instead.
    `sensitivity`: a `probe_sensitivity` result to reuse; otherwise the model is probed here with
    `inputs` (or synthesised ones), `method`, the candidate `nbits` x `granularities`, and `seed`.
    `importance=True` also scores, per layer and spec, k-means weighted by the probe's Fisher
    importance, and keeps it (its LUT stored in the recipe) only where it predicts less error.
    `calibrate=True` runs the chosen recipe on the probe set (two forward passes: with and without
    it) and makes that measured PSNR the recipe's `predicted_psnr`: the additive first-order sum is
    optimistic at low bits, where layers' errors grow and interact nonlinearly; it stays in
    `info["additive_psnr"]`. Without the probe set (a `sensitivity` from inputs not given here)
    the additive estimate is kept and `info["calibration"]` says why.
    The model is not modified.
    """
    if (budget_gb is None) == (budget_bits is None):
        raise ValueError("give exactly one of budget_gb (whole model, decimal GB) or budget_bits")
    budget = budget_gb if budget_gb is not None else budget_bits
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"the budget must be a positive number, got {budget!r}")
    targets = target_layers(model, min_numel)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv layers with >= {min_numel} weights")
    if sensitivity is None:
        from .probe import probe_sensitivity

        sensitivity = probe_sensitivity(
            model, inputs, method=method, nbits=nbits, granularities=granularities,
            group_size=group_size, seed=seed, min_numel=min_numel, progress=progress,
            importance=importance, keep_sketch=importance, **probe_kwargs,
        )
    options = layer_options(model, targets, sensitivity)
    if importance:
        add_weighted_options(targets, sensitivity, options, seed, progress)
    if max_chunk_bytes is not None:
        options = {n: [o for o in opts if o.nbytes <= max_chunk_bytes] or opts for n, opts in options.items()}
    fixed = fixed_bytes(model, targets)
    numel = sum(m.weight.numel() for m in targets.values())
    full = fixed + 2 * numel
    smallest = fixed + sum(min(o.nbytes for o in opts) for opts in options.values())
    capacity = int(budget_gb * GB) if budget_gb is not None else fixed + int(budget_bits * numel / 8)
    info: dict[str, Any] = {
        "budget": {"gb": budget_gb, "bits": budget_bits, "bytes": capacity},
        "method": sensitivity.method,
        "candidates": sorted({o.spec.label for opts in options.values() for o in opts if o.spec}),
        "probe_inputs": sensitivity.inputs_description,
    }
    if capacity < smallest:
        raise ValueError(
            f"the budget ({capacity / GB:.6f} GB, {_bits(capacity - fixed, numel):.3f} bits per "
            f"weight) is below the smallest size reachable with these candidates: "
            f"{smallest / GB:.6f} GB ({_bits(smallest - fixed, numel):.3f} bits per weight, every "
            f"layer at its smallest spec; {fixed / GB:.6f} GB of other parameters stay at 16 bits)"
        )
    if capacity >= full:
        note = (f"the budget ({capacity / GB:.6f} GB) holds the whole model at 16 bits "
                f"({full / GB:.6f} GB): nothing is palettized")
        warnings.warn(note, stacklevel=2)
        info.update(note=note, gap=0.0)
        return from_mapping(model, {}, min_numel=min_numel, predicted_psnr=None, seed=seed, info=info)
    sol = solve(options, capacity - fixed)
    mapping = {n: o.spec for n, o in sol.choice.items()}
    info.update(predicted_mse=sol.error, lower_bound_mse=sol.lower_bound, gap=sol.gap)
    recipe = from_mapping(model, mapping, min_numel=min_numel,
                          predicted_psnr=predict_psnr(sensitivity, sol.choice), seed=seed, info=info)
    recipe.luts = {n: o.lut for n, o in sol.choice.items() if o.lut is not None}
    if calibrate:
        _calibrate(model, recipe, sensitivity, inputs, probe_kwargs)
    if max_chunk_bytes is not None:
        from .export.chunk import chunks_needed, layer_bytes_in_order

        example = inputs if isinstance(inputs, (torch.Tensor, tuple, dict)) else None
        recipe.info.update(max_chunk_bytes=max_chunk_bytes,
                           chunks=chunks_needed(layer_bytes_in_order(model, recipe, example), max_chunk_bytes))
    assert recipe.size_bytes <= capacity
    return recipe


PROBE_SET_KWARGS = ("n_samples", "batch_size", "text_encoder", "tokenizer", "scheduler")


def _calibrate(model: nn.Module, recipe: Recipe, sensitivity: Any, inputs: Any, probe_kwargs: dict) -> None:
    """Measure the recipe on the probe set the sensitivity came from; record it as predicted."""
    from .measure import measure_on
    from .probe_inputs import make_probe_set

    recipe.info["additive_psnr"] = recipe.predicted_psnr
    kw = {k: probe_kwargs[k] for k in PROBE_SET_KWARGS if k in probe_kwargs}
    try:
        probe = make_probe_set(model, inputs, seed=sensitivity.seed, **kw)
    except ValueError as e:
        recipe.info["calibration"] = f"not calibrated: no probe inputs ({e})"
        return
    if probe.description != sensitivity.inputs_description:
        recipe.info["calibration"] = (
            f"not calibrated: the sensitivity was probed on {sensitivity.inputs_description!r}, "
            f"these inputs are {probe.description!r}; pass the probe inputs to calibrate"
        )
        return
    recipe.predicted_psnr = measure_on(model, recipe.palettes(model), probe, seed=sensitivity.seed).psnr
    recipe.info["calibration"] = f"measured on the probe set ({probe.description}), 2 forward passes"


def predict_psnr(sensitivity: Any, choice: Mapping[str, Option]) -> float:
    """Additive prediction of Apple's PSNR for a choice: per-sample errors summed over layers."""
    total = sum((o.per_sample for o in choice.values() if o.spec is not None), np.zeros(len(sensitivity.peak)))
    return float(psnr_from_mse(total, sensitivity.peak).mean())


def add_weighted_options(
    targets: Mapping[str, nn.Module], sensitivity: Any, options: dict[str, list[Option]], seed: int,
    progress: bool,
) -> None:
    """Add, per layer and scalar spec, the importance-weighted palette where the probe predicts it
    beats the plain one (same size, less error)."""
    if sensitivity.importance is None or sensitivity.sketch is None:
        raise ValueError(
            "importance=True needs a sensitivity probed with importance=True, keep_sketch=True "
            "(method='fast'); pass none to probe here"
        )
    for n in tqdm(list(options), desc="weighted k-means", disable=not progress, leave=False):
        plain = [o for o in options[n] if o.spec is not None and o.spec.cluster_dim == 1]
        weight = targets[n].weight
        pals = fit_palettes(weight, [o.spec for o in plain], sensitivity.importance[n], seed=seed, name=n)
        for o, pal in zip(plain, pals):
            per_sample = sensitivity.estimate(n, pal, per_sample=True)
            err = float(np.average(per_sample, weights=sensitivity.sample_size))
            if err < o.error:
                options[n].append(Option(o.spec, o.nbytes, err, per_sample, pal.lut))


def _bits(nbytes: int, numel: int) -> float:
    return 8 * nbytes / numel


def layer_options(model: nn.Module, targets: Mapping[str, nn.Module], sensitivity: Any) -> dict[str, list[Option]]:
    """Every layer's choices: 16 bits, or each probed spec that applies, with predicted errors."""
    missing = [n for n in targets if n not in sensitivity.layers]
    changed = [n for n in targets if n in sensitivity.layers
               and tuple(sensitivity.layers[n].shape) != tuple(targets[n].weight.shape)]
    if missing or changed:
        raise ValueError(
            f"the sensitivity does not match this model: {len(missing)} target layer(s) were not "
            f"probed {missing[:5]}, {len(changed)} changed shape {changed[:5]}; probe this model"
        )
    out = {}
    for n, m in targets.items():
        opts = [Option(None, 2 * m.weight.numel(), 0.0)]
        for i, spec in enumerate(sensitivity.specs):
            if sensitivity.nbytes[n][i] is not None:
                opts.append(Option(spec, sensitivity.nbytes[n][i], sensitivity.error(n, spec),
                                   sensitivity.errors_per_sample(n, spec)))
        out[n] = opts
    return out
