"""Mixed-bit allocation: the spec of every layer that minimises predicted output error under a size
budget, a multiple-choice knapsack solved with a bound on how far from optimal it can be.

Each target layer may stay at 16 bits or take any probed spec; its predicted error comes from
`probe_sensitivity` (errors add across layers) and its size is exact (`PaletteSpec.nbytes`). The
solver walks the layers' lower convex hulls in order of error saved per byte (the Lagrangian /
LP-relaxation optimum, which bounds the best possible error from below), keeps every step that
fits, then spends what is left on the single-layer switch that saves the most, until none fits.

`allocate(sensitivity, base, budget)` is pure (no model run): it turns a sensitivity and the
model's all-16-bit recipe into a recipe. `allocate_bits(model, budget_gb=...)` is the one-call
convenience: probe -> allocate -> `calibrate_recipe` (run the chosen recipe once on the probe set),
or `refine_recipe` (a measured correction where layers' errors interact: knapsack again with each
group's errors scaled by its measured / additive ratio, keep the recipe that measures best).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from decimal import ROUND_FLOOR, Decimal

from ._checks import check_loaded, integer, number
from .metrics import significant
from .palettize import untouched
from .chunking import chunks_needed, layer_bytes_in_order
from .cluster import fit_palettes
from .probe import Measurement, ProbeSet, Sensitivity, make_probe_set, measure, probe_sensitivity
from .probe.measure import outputs, outputs_with, per_sample_mse
from .probe.pipeline_inputs import PIPELINE_SAMPLES
from .probe.run import as_candidates
from .recipe import Candidates, Recipe
from .spec import PaletteSpec

if TYPE_CHECKING:
    from .pipeline import PipelineRecipe

GB = 1e9  # budgets count decimal gigabytes
# Predicted errors are compared, and PSNRs recorded, at these significant digits: the same choices and
# the same recipe bytes with any torch thread count (README, "Guarantees").
ERROR_DIGITS = 3
PSNR_DIGITS = 4


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


def layer_options(sensitivity: Sensitivity, names: Sequence[str]) -> dict[str, list[Option]]:
    """Every layer's choices: 16 bits, or each probed spec that applies, with predicted errors."""
    out = {}
    for n in names:
        info = sensitivity.layers[n]
        opts = [Option(None, 2 * info.numel, 0.0)]
        for i, spec in enumerate(sensitivity.specs):
            if sensitivity.nbytes[n][i] is not None:
                # rounded: float noise of another thread count never changes a choice
                opts.append(Option(spec, sensitivity.nbytes[n][i], significant(sensitivity.error(n, spec), ERROR_DIGITS),
                                   sensitivity.errors_per_sample(n, spec)))
        out[n] = opts
    return out


def add_weighted_options(
    model: nn.Module, sensitivity: Sensitivity, options: dict[str, list[Option]], seed: int, progress: bool,
) -> None:
    """Add, per layer and scalar spec, the importance-weighted palette where the probe predicts it
    beats the plain one (same size, less error)."""
    if sensitivity.importance is None or sensitivity.sketch is None:
        raise ValueError(
            "importance=True needs a sensitivity probed with importance=True, keep_sketch=True "
            "(method='fast'); pass none to probe here"
        )
    modules = dict(model.named_modules())
    for n in tqdm(list(options), desc="weighted k-means", disable=not progress, leave=False):
        plain = [o for o in options[n] if o.spec is not None and o.spec.cluster_dim == 1]
        pals = fit_palettes(modules[n].weight, [o.spec for o in plain], sensitivity.importance[n], seed=seed, name=n)
        for o, pal in zip(plain, pals):
            per_sample = sensitivity.estimate(n, pal, per_sample=True)
            err = significant(float(np.average(per_sample, weights=sensitivity.sample_size)), ERROR_DIGITS)
            if err < o.error:
                options[n].append(Option(o.spec, o.nbytes, err, per_sample, pal.lut))


def check_budget(budget_gb: Any, budget_bits: Any) -> tuple[float | None, float | None]:
    """Exactly one of the two budgets, a finite positive number (a ValueError naming it otherwise)."""
    if (budget_gb is None) == (budget_bits is None):
        raise ValueError("give exactly one of budget_gb (whole model, decimal GB) or budget_bits")
    if budget_gb is not None:
        return number(budget_gb, "budget_gb", positive=True), None
    return None, number(budget_bits, "budget_bits", positive=True)


def budget_bytes(budget_gb: float | None, budget_bits: float | None, fixed: int, numel: int) -> int:
    """The budget in whole bytes, computed exactly (decimal arithmetic on the number as written, so
    that a budget of exactly a reachable size, e.g. `size_bytes / 1e9`, is that size and not one
    byte less from binary rounding); a huge budget is a huge int, never an OverflowError."""
    if budget_gb is not None:
        gb = Decimal(repr(float(budget_gb)))
        return int((gb * Decimal(int(GB))).to_integral_value(rounding=ROUND_FLOOR))
    bits = Decimal(repr(float(budget_bits)))
    return fixed + int((bits * numel / 8).to_integral_value(rounding=ROUND_FLOOR))


def _bits(nbytes: int, numel: int) -> float:
    return 8 * nbytes / numel


def allocate(
    sensitivity: Sensitivity,
    base: Recipe,
    budget_gb: float | None = None,
    *,
    budget_bits: float | None = None,
    options: Mapping[str, Sequence[Option]] | None = None,
    max_chunk_bytes: int | None = None,
) -> Recipe:
    """The recipe with the least predicted output error whose stored size fits the budget: `base`
    (the model's recipe with every target at 16 bits, `Recipe.dense`) with each layer's spec chosen
    from `options` (default: `layer_options` of the sensitivity). Pure: no model run.

    `budget_gb`: decimal GB of the whole model as stored (palettized weights, LUTs, scales, and
    every other parameter at 16 bits). `budget_bits`: average bits per target weight instead.
    `max_chunk_bytes` rules out any option storing more than that in one weight. Its
    `predicted_psnr` is the additive estimate (`calibrate_recipe` measures it)."""
    budget_gb, budget_bits = check_budget(budget_gb, budget_bits)
    opts = dict(options) if options is not None else layer_options(sensitivity, list(base.layers))
    if max_chunk_bytes is not None:
        opts = {n: [o for o in os_ if o.nbytes <= max_chunk_bytes] or list(os_) for n, os_ in opts.items()}
    fixed = base.fixed_bytes
    numel = sum(math.prod(s) for s in base.shapes.values())
    full = fixed + 2 * numel
    smallest = fixed + sum(min(o.nbytes for o in layer) for layer in opts.values())
    capacity = min(budget_bytes(budget_gb, budget_bits, fixed, numel), full)  # more than the model: all of it
    info: dict[str, Any] = {
        **base.info,
        "budget": {"gb": budget_gb, "bits": budget_bits, "bytes": capacity},
        "method": sensitivity.method,
        "candidates": sorted({o.spec.label for layer in opts.values() for o in layer if o.spec}),
        "probe_inputs": sensitivity.inputs_description,
    }
    recipe = dataclasses.replace(base, layers=dict(base.layers), info=info, luts={})
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
        warnings.warn(note, stacklevel=3)
        info.update(note=note, gap=0.0)
        recipe.predicted_psnr = None
        return recipe
    sol = solve(opts, capacity - fixed)
    recipe.layers.update({n: o.spec for n, o in sol.choice.items()})
    info.update(predicted_mse=significant(sol.error, ERROR_DIGITS), lower_bound_mse=significant(sol.lower_bound, ERROR_DIGITS),
                gap=significant(sol.gap, ERROR_DIGITS))
    total = np.zeros(len(sensitivity.peak), dtype=np.float64)
    for n in sorted(sol.choice):  # float64, in a fixed order
        if sol.choice[n].spec is not None:
            total = total + np.asarray(sol.choice[n].per_sample, dtype=np.float64)
    recipe.predicted_psnr = significant(sensitivity.psnr_of(total), PSNR_DIGITS)
    recipe.luts = {n: o.lut for n, o in sol.choice.items() if o.lut is not None}
    if max_chunk_bytes is not None:
        info["max_chunk_bytes"] = max_chunk_bytes
    assert recipe.size_bytes <= capacity
    return recipe


def calibrate_recipe(model: nn.Module, recipe: Recipe, probe: ProbeSet, sensitivity: Sensitivity) -> None:
    """Measure the recipe on the probe set the sensitivity came from (two forward passes: with and
    without it) and record that as its `predicted_psnr`; the additive first-order sum, optimistic at
    low bits where layers' errors grow and interact nonlinearly, stays in `info["additive_psnr"]`.
    A probe set other than the sensitivity's is not used, and `info["calibration"]` says so."""
    recipe.info["additive_psnr"] = recipe.predicted_psnr
    if probe.description != sensitivity.inputs_description:
        recipe.info["calibration"] = (
            f"not calibrated: the sensitivity was probed on {sensitivity.inputs_description!r}, "
            f"these inputs are {probe.description!r}; pass the probe inputs to calibrate"
        )
        return
    recipe.predicted_psnr = significant(measure(model, recipe, probe).psnr, PSNR_DIGITS)
    recipe.info["calibration"] = f"measured on the probe set ({probe.description}), 2 forward passes"


def layer_group(name: str) -> str:
    """A layer's group for `refine_recipe`: its top-level module (a pipeline's component)."""
    return name.split(".", 1)[0]


def _chosen(options: Mapping[str, Sequence[Option]], recipe: Recipe, name: str) -> Option:
    """The option `recipe` took for layer `name` (its spec, and a stored LUT or not)."""
    return next(o for o in options[name] if o.spec == recipe.layers[name] and (o.lut is not None) == (name in recipe.luts))


def refine_recipe(
    model: nn.Module,
    recipe: Recipe,
    probe: ProbeSet,
    options: Mapping[str, Sequence[Option]],
    solve_again: Callable[[Mapping[str, Sequence[Option]]], Recipe],
    rounds: int,
    groups: Callable[[str], str] = layer_group,
) -> Recipe:
    """A measured correction for layers whose errors interact, and calibration: `recipe`
    (`allocate`'s, from `options`) and up to `rounds` recipes re-solved by `solve_again`, each
    measured whole on `probe` (the sensitivity's probe set); the one with the best measured PSNR,
    that PSNR its `predicted_psnr` (the first recipe unless another measures better).

    The additive sum `allocate` minimises is optimistic where layers' errors interact (at low bits)
    and not evenly so across the model. Each round measures the current recipe with one group of
    layers (`groups`: layer -> group; top-level modules, a pipeline's components) palettized at a
    time, scales every option of a group's layers by the group's measured / additive error, and
    solves again. Cost: 2 forward passes over the probe set (the reference and the recipe, as
    `calibrate_recipe`), then per round one per group with palettized layers and one for the new
    recipe; a round giving back a recipe already measured ends it. `info["refine"]` records the
    rounds' ratios and measured PSNRs and which recipe was kept."""
    refs = outputs(model, probe)
    fitted: dict[tuple, Any] = {}  # (layer, spec, stored LUT) -> palette, fitted once

    def run(r: Recipe, names: Sequence[str]) -> list[torch.Tensor]:
        keys = {n: (n, r.layers[n], n in r.luts) for n in names if r.layers[n] is not None}
        todo = {n for n, k in keys.items() if k not in fitted}
        if todo:
            sub = dataclasses.replace(r, layers={n: s if n in todo else None for n, s in r.layers.items()},
                                      luts={n: t for n, t in r.luts.items() if n in todo})
            fitted.update({keys[n]: p for n, p in sub.palettes(model).items()})
        return outputs_with(model, {n: fitted[k] for n, k in keys.items()}, probe)

    def whole(r: Recipe) -> float:
        return significant(Measurement.of(run(r, list(r.layers)), refs, probe.description).psnr, PSNR_DIGITS)

    names = list(recipe.layers)
    members = {g: [n for n in names if groups(n) == g] for g in dict.fromkeys(groups(n) for n in names)}
    tried = [recipe]
    psnrs = [whole(recipe)]
    log: list[dict[str, Any]] = []
    passes = 2
    for _ in range(rounds if len(members) > 1 else 0):
        current = tried[-1]
        ratios = {}
        for g, layers in members.items():
            chosen = [n for n in layers if current.layers[n] is not None]
            if not chosen:
                continue
            additive = sum(np.asarray(_chosen(options, current, n).per_sample, dtype=np.float64) for n in sorted(chosen))
            measured = per_sample_mse(run(current, chosen), refs)
            passes += 1
            ratios[g] = significant(float(measured.mean() / additive.mean()), ERROR_DIGITS)
        scaled = {n: [dataclasses.replace(o, error=significant(o.error * ratios.get(groups(n), 1.0), ERROR_DIGITS))
                      for o in opts] for n, opts in options.items()}
        new = solve_again(scaled)
        step: dict[str, Any] = {"ratios": ratios}
        log.append(step)
        if any(new.layers == r.layers and new.luts.keys() == r.luts.keys() for r in tried):
            break
        tried.append(new)
        psnrs.append(whole(new))
        passes += 1
        step["measured_psnr"] = psnrs[-1]
    best = max(range(len(tried)), key=lambda i: (psnrs[i], -i))
    out = tried[best]
    out.info["additive_psnr"] = out.predicted_psnr
    out.predicted_psnr = psnrs[best]
    out.info["calibration"] = f"measured on the probe set ({probe.description}), {passes} forward passes in all"
    out.info["refine"] = {"first_measured_psnr": psnrs[0], "rounds": log, "kept": best, "forward_passes": passes}
    return out


def allocate_bits(
    model: nn.Module,
    budget_gb: float | None = None,
    *,
    budget_bits: float | None = None,
    inputs: ProbeSet | Any = None,
    n_samples: int | None = None,
    sensitivity: Sensitivity | None = None,
    candidates: Candidates | Sequence[PaletteSpec] | None = None,
    method: str = "fast",
    n_probes: int | None = None,
    seed: int = 0,
    importance: bool = False,
    max_chunk_bytes: int | None = None,
    calibrate: bool = True,
    refine: int | None = None,
    cache: str | None = None,
    progress: bool = True,
) -> "Recipe | PipelineRecipe":
    """The recipe with the least predicted output error whose stored size fits the budget:
    probe (unless `sensitivity` is given) -> `allocate` -> `calibrate_recipe`.

    `budget_gb`: decimal GB of the whole model as stored; `budget_bits`: average bits per target
    weight instead. `inputs`: a `ProbeSet` (`make_probe_set`) or what it takes (None synthesises
    data-free inputs), built once and used to probe and to calibrate; `n_samples`: how many
    samples it synthesises (default `DEFAULT_SAMPLES`; for a pipeline, prompts with their seeds,
    default `PIPELINE_SAMPLES`). `candidates`: the layers and specs that compete (`Candidates`;
    `APPLE` for recipes Apple's ml-stable-diffusion flow applies in full). `importance=True` also
    scores, per layer and spec, k-means weighted by the probe's Fisher importance, and keeps it (its
    LUT stored in the recipe) only where it predicts less error.
    `calibrate=True` makes the recipe measured on the probe set its `predicted_psnr`; without the
    probe set (a `sensitivity` from inputs not given here) the additive estimate is kept and
    `info["calibration"]` says why. `refine`: rounds of the measured correction for interacting
    layers (`refine_recipe`, in place of `calibrate_recipe`; needs `calibrate` and the probe set;
    default 0 for one model, 2 for a pipeline). The model is not modified (`untouched`: run in eval
    mode, every training flag and buffer restored, also on an exception or Ctrl-C).

    Given a pipeline (a diffusers pipeline, the default pipeline, or a mapping of named components)
    instead of one model: one budget for all its components, allocated jointly on the generated
    image, as a `PipelineRecipe` (`palette.pipeline.allocate_pipeline`; `inputs`: prompts).
    """
    budget_gb, budget_bits = check_budget(budget_gb, budget_bits)
    if n_probes is not None:
        n_probes = integer(n_probes, "n_probes", minimum=1)
    if n_samples is not None:
        n_samples = integer(n_samples, "n_samples", minimum=1)
    seed = integer(seed, "seed")
    if not isinstance(model, nn.Module):
        from .pipeline import allocate_pipeline

        if importance or max_chunk_bytes is not None:
            raise ValueError("importance and max_chunk_bytes apply to one model, not to a pipeline")
        if inputs is not None and not (isinstance(inputs, (list, tuple)) and all(isinstance(p, str) for p in inputs)):
            raise ValueError("a pipeline's inputs are prompts (a list of strings)")
        return allocate_pipeline(model, budget_gb, budget_bits=budget_bits, prompts=inputs,
                                 n_samples=PIPELINE_SAMPLES if n_samples is None else n_samples,
                                 sensitivity=sensitivity, candidates=candidates, method=method, n_probes=n_probes,
                                 seed=seed, calibrate=calibrate, refine=refine, cache=cache, progress=progress)
    refine = 0 if refine is None else integer(refine, "refine", minimum=0)
    check_loaded(model)
    with untouched(model):
        return _allocate_bits(model, budget_gb, budget_bits, inputs, n_samples, sensitivity, candidates, method,
                              n_probes, seed, importance, max_chunk_bytes, calibrate, refine, cache, progress)


def _allocate_bits(model, budget_gb, budget_bits, inputs, n_samples, sensitivity, candidates, method, n_probes, seed,
                   importance, max_chunk_bytes, calibrate, refine, cache, progress) -> Recipe:
    cands = as_candidates(candidates)
    targets = cands.layers(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv layers with >= {cands.min_numel} weights")
    probe = None
    try:
        probe_seed = seed if sensitivity is None else sensitivity.seed
        probe = inputs if isinstance(inputs, ProbeSet) else make_probe_set(model, inputs, seed=probe_seed,
                                                                           n_samples=n_samples)
    except ValueError as e:
        if sensitivity is None:
            raise
        no_probe = f"not calibrated: no probe inputs ({e})"
    if sensitivity is None:
        sensitivity = probe_sensitivity(model, probe, cands, method=method, n_probes=n_probes, seed=seed,
                                        cache=cache, importance=importance, keep_sketch=importance,
                                        progress=progress)
    missing = [n for n in targets if n not in sensitivity.layers]
    changed = [n for n in targets if n in sensitivity.layers
               and tuple(sensitivity.layers[n].shape) != tuple(targets[n].weight.shape)]
    if missing or changed:
        raise ValueError(
            f"the sensitivity does not match this model: {len(missing)} target layer(s) were not "
            f"probed {missing[:5]}, {len(changed)} changed shape {changed[:5]}; probe this model"
        )
    options = layer_options(sensitivity, list(targets))
    if importance:
        add_weighted_options(model, sensitivity, options, seed, progress)
    base = Recipe.dense(model, targets, seed=seed)
    def solve_with(opts: Mapping[str, Sequence[Option]]) -> Recipe:
        return allocate(sensitivity, base, budget_gb, budget_bits=budget_bits, options=opts,
                        max_chunk_bytes=max_chunk_bytes)

    recipe = solve_with(options)
    if calibrate and recipe.palettized:
        if probe is None:
            recipe.info["additive_psnr"] = recipe.predicted_psnr
            recipe.info["calibration"] = no_probe
        elif refine and probe.description == sensitivity.inputs_description:
            recipe = refine_recipe(model, recipe, probe, options, solve_with, refine)
        else:
            if refine:
                warnings.warn(f"refine={refine} not run: the measured correction needs the sensitivity's own probe "
                              f"set ({sensitivity.inputs_description}), not {probe.description}; pass those inputs",
                              stacklevel=3)
            calibrate_recipe(model, recipe, probe, sensitivity)
    if max_chunk_bytes is not None:
        example = inputs if isinstance(inputs, (torch.Tensor, tuple, dict)) else None
        recipe.info["chunks"] = chunks_needed(layer_bytes_in_order(model, recipe, example), max_chunk_bytes)
    return recipe
