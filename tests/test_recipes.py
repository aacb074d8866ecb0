"""The shipped recipes in recipes/: each one loads, fits the model it was computed for (the shipped
weights, by fingerprint), has the size it says, and measures the PSNR it records; the sensitivity
shipped with it reproduces it; recipes/README.md quotes them and the hub specs correctly."""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path

import pytest

from palette.allocate import allocate_bits
from palette.cli import build_parser
from palette.models.load import Loaded, load_model
from palette.probe import Sensitivity, measure
from palette.recipe import ModelIdentity, Recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PATHS = sorted(p for p in RECIPES.glob("*.json") if json.loads(p.read_text()).get("format") == "palette.recipe")
TOLERANCE_DB = 0.05  # measurement is deterministic on one machine; this allows for BLAS differences


def command(recipe: Recipe):
    return build_parser().parse_args(shlex.split(recipe.info["command"])[1:])


@functools.lru_cache(maxsize=None)
def model(spec: str, subfolder: str | None, config: str | None) -> Loaded:
    return load_model(spec, subfolder, config)


def test_recipes_are_shipped_for_both_models() -> None:
    models = {command(Recipe.load(p)).model for p in PATHS}
    assert {"default", "minilm"} <= models
    assert all(len([p for p in PATHS if command(Recipe.load(p)).model == m]) >= 2 for m in models)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_recipe_revalidates_against_the_shipped_weights(path: Path) -> None:
    recipe = Recipe.load(path)
    args = command(recipe)
    loaded = model(args.model, args.subfolder, args.config)
    recipe.check(loaded.model)
    assert recipe.model.fingerprint == ModelIdentity.of(loaded.model).fingerprint, "the weights changed: recompute"
    assert Recipe.from_specs(loaded.model, recipe.layers).size_bytes == recipe.size_bytes
    recorded = recipe.info["measured"]
    got = measure(loaded.model, recipe, loaded.probe_set(recorded["samples"], recorded["seed"]))
    assert got.psnr == pytest.approx(recorded["psnr"], abs=TOLERANCE_DB)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_shipped_sensitivity_reproduces_the_recipe(path: Path) -> None:
    recipe = Recipe.load(path)
    args = command(recipe)
    loaded = model(args.model, args.subfolder, args.config)
    sens = Sensitivity.load(RECIPES.parent / args.sensitivity)
    again = allocate_bits(loaded.model, args.budget_gb, budget_bits=args.budget_bits, sensitivity=sens,
                          seed=args.seed, progress=False)
    assert again.layers == recipe.layers and again.size_bytes == recipe.size_bytes


def test_readme_table_quotes_every_recipe() -> None:
    text = (RECIPES / "README.md").read_text()
    for path in PATHS:
        recipe = Recipe.load(path)
        row = next((line for line in text.splitlines() if f"`{path.name}`" in line), None)
        assert row is not None, f"{path.name} is not in recipes/README.md"
        assert f"{recipe.info['measured']['psnr']:.2f}" in row and f"{recipe.size_bytes:,}" in row
        assert f"{recipe.bits_per_weight:.2f}" in row


def test_hub_specs_have_their_commands() -> None:
    specs = json.loads((RECIPES / "hub_specs.json").read_text())
    text = (RECIPES / "README.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("palette ")]
    parser = build_parser()
    for line in lines:
        parser.parse_args(shlex.split(line)[1:])
    ids = {m["model_id"] for m in specs["models"]}
    assert ids == {"stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1-base",
                   "stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-3-medium-diffusers",
                   "stabilityai/stable-diffusion-3.5-large", "black-forest-labs/FLUX.1-schnell",
                   "black-forest-labs/FLUX.1-dev", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
                   "Efficient-Large-Model/Sana_600M_1024px_diffusers",
                   "Efficient-Large-Model/Sana_1600M_1024px_diffusers"}
    for m in specs["models"]:
        for c in m["components"]:
            for flag, key in (("--budget-gb", "budgets_gb"), ("--budget-bits", "budgets_bits")):
                for b in c.get(key, []):
                    pattern = rf"--model {re.escape(m['model_id'])} --subfolder {c['subfolder']} .*{flag} {b} "
                    assert any(re.search(pattern, line) for line in lines), (m["name"], c["subfolder"], b)
