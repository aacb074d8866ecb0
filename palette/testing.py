"""Assertions for your own test suite (pytest or any runner): each one returns quietly or raises an
AssertionError whose message says what differs -- the layers, the figure and by how much.

    from palette.testing import assert_fits_budget, assert_applies, assert_psnr_at_least
    assert_fits_budget("unet_recipe.json", budget_gb=1.0)
    assert_applies("unet_recipe.json", unet)                       # names and shapes
    assert_psnr_at_least(unet, "unet_recipe.json", 40.0, inputs)   # measured, the model unchanged
    assert_same_recipe("golden.json", recipe, psnr_tol_db=0.5)     # Recipe.diff, with a tolerance
    assert_matches_golden(recipe, "golden.json")                   # byte for byte

A recipe argument is a `Recipe` or the path of a recipe JSON file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from ._jsonio import write_atomic
from .probe.measure import Measurement, measure
from .recipe import Recipe, layer_bytes
from .recipe_diff import diff, label

GB = 1e9
RecipeLike = Recipe | str | os.PathLike


def _recipe(recipe: RecipeLike) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)


def _largest(recipe: Recipe, n: int = 5) -> str:
    sizes = sorted(((layer_bytes(s, recipe.shapes[k]), k, label(s)) for k, s in recipe.layers.items()), reverse=True)
    return ", ".join(f"{k} ({lab}, {b:,} B)" for b, k, lab in sizes[:n])


def assert_fits_budget(recipe: RecipeLike, *, budget_gb: float | None = None, budget_bits: float | None = None,
                       budget_bytes: int | None = None) -> None:
    """The recipe's whole model as stored fits one budget: `budget_gb` (decimal GB) or `budget_bytes`
    of the whole model, or `budget_bits` bits per target weight (in bytes as `allocate_bits` counts
    it: everything else at 16 bits plus `budget_bits` x target weights / 8)."""
    r = _recipe(recipe)
    given = [b for b in (budget_gb, budget_bits, budget_bytes) if b is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of budget_gb, budget_bits or budget_bytes")
    numel = sum(math.prod(s) for s in r.shapes.values())
    if budget_gb is not None:
        capacity, what = int(budget_gb * GB), f"{budget_gb:g} GB"
    elif budget_bits is not None:
        capacity, what = r.fixed_bytes + int(budget_bits * numel / 8), f"{budget_bits:g} bits/weight"
    else:
        capacity, what = int(budget_bytes), f"{budget_bytes:,} B"  # type: ignore[arg-type]
    if r.size_bytes > capacity:
        raise AssertionError(
            f"size {r.size_bytes:,} B ({r.bits_per_weight:.4f} bits/weight) is {r.size_bytes - capacity:,} B over "
            f"the budget of {what} ({capacity:,} B); largest layers: {_largest(r)}"
        )


def assert_applies(recipe: RecipeLike, model: nn.Module) -> None:
    """Every layer of the recipe is a target layer of `model` with the same weight shape."""
    try:
        _recipe(recipe).check(model)
    except ValueError as e:
        raise AssertionError(str(e)) from None


def assert_psnr_at_least(model: nn.Module, recipe: RecipeLike, min_db: float, inputs: Any = None, *,
                         seed: int = 0, n_samples: int = 8) -> Measurement:
    """The recipe's measured output PSNR on `inputs` (a ProbeSet, user inputs, or None for
    `n_samples` data-free ones with `seed`: as `measure` takes them) is at least `min_db` dB (the
    mean over samples, Apple's definition). Returns the measurement; the model is left unchanged."""
    m = measure(model, _recipe(recipe), inputs, seed=seed, n_samples=n_samples)
    if not m.psnr >= min_db:
        worst = sorted(enumerate(m.per_sample_psnr), key=lambda t: t[1])[:3]
        raise AssertionError(
            f"measured PSNR {m.psnr:.2f} dB < {min_db:g} dB ({min_db - m.psnr:.2f} dB short) on {m.description}; "
            "lowest samples: " + ", ".join(f"#{i} {p:.2f} dB" for i, p in worst)
        )
    return m


def assert_same_recipe(expected: RecipeLike, actual: RecipeLike, *, psnr_tol_db: float = 0.1) -> None:
    """The recipes are equivalent (`Recipe.diff`: same layers, specs, stored LUTs and bytes) and
    their predicted PSNRs are within `psnr_tol_db` dB."""
    d = diff(_recipe(expected), _recipe(actual), psnr_tol_db=psnr_tol_db)
    if d:
        raise AssertionError(f"the recipes differ (expected -> actual):\n{d}")


def assert_matches_golden(recipe: RecipeLike, golden: str | os.PathLike, *, update: bool = False) -> None:
    """The recipe's file (`Recipe.dumps`, or the file itself) is byte-identical to the `golden` file:
    re-allocate with the same seed (and inputs) and compare. The message shows `Recipe.diff` when
    layers differ, else the first line that does. `update=True` (re)writes the golden file instead
    (atomically) and passes: for accepting a change on purpose."""
    text = recipe.dumps() if isinstance(recipe, Recipe) else Path(recipe).read_text()
    golden = Path(golden)
    if update:
        write_atomic(golden, text)
        return
    if not golden.exists():
        raise AssertionError(f"no golden recipe at {golden}: write it once with update=True (or Recipe.save)")
    want = golden.read_text()
    if text == want:
        return
    d = diff(Recipe.load(golden), _recipe(recipe), psnr_tol_db=0.0)
    if d:
        raise AssertionError(f"recipe differs from the golden {golden} (golden -> new):\n{d}")
    for i, (a, b) in enumerate(zip(want.splitlines(), text.splitlines()), 1):
        if a != b:
            raise AssertionError(f"recipe file differs from the golden {golden} at line {i} "
                                 f"(the plan is the same): {a.strip()!r} -> {b.strip()!r}")
    raise AssertionError(f"recipe file differs from the golden {golden} in length: "
                         f"{len(want):,} -> {len(text):,} characters")


__all__ = ["assert_applies", "assert_fits_budget", "assert_matches_golden", "assert_psnr_at_least",
           "assert_same_recipe"]
