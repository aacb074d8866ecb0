"""palette.testing: every assertion passes on a good case and fails on a bad one with a message that
names the layer or the figure."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest
from torch import nn

from palette.allocate import allocate_bits
from palette.models.load import load_model
from palette.models.zoo import build
from palette.probe import Sensitivity, make_probe_set
from palette.recipe import Recipe, layer_bytes
from palette.spec import PaletteSpec
from palette.testing import (
    assert_applies,
    assert_fits_budget,
    assert_matches_golden,
    assert_psnr_at_least,
    assert_same_recipe,
)

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
THREE = RECIPES / "default_3bit.json"


@functools.lru_cache(maxsize=None)
def tiny() -> nn.Module:
    return build("sd15-unet", tiny=True)


def test_fits_budget() -> None:
    r = Recipe.load(THREE)
    assert_fits_budget(THREE, budget_bits=3)
    assert_fits_budget(r, budget_bytes=r.size_bytes)
    assert_fits_budget(r, budget_gb=r.size_bytes / 1e9)
    with pytest.raises(AssertionError) as e:
        assert_fits_budget(r, budget_bytes=r.size_bytes - 1)
    assert f"size {r.size_bytes:,} B" in str(e.value) and "1 B over" in str(e.value)
    biggest = max(r.layers, key=lambda n: layer_bytes(r.layers[n], r.shapes[n]))
    assert f"largest layers: {biggest} (" in str(e.value)
    with pytest.raises(AssertionError, match=r"over the budget of 2.5 bits/weight"):
        assert_fits_budget(THREE, budget_bits=2.5)
    with pytest.raises(ValueError, match="exactly one"):
        assert_fits_budget(r, budget_bits=3, budget_gb=1)


def test_applies() -> None:
    unet = tiny()
    good = Recipe.from_specs(unet, PaletteSpec(4))
    assert_applies(good, unet)
    name = next(iter(good.layers))
    wrong = dataclasses.replace(good, shapes={**good.shapes, name: (3, 5)})
    with pytest.raises(AssertionError) as e:
        assert_applies(wrong, unet)
    assert name in str(e.value) and "(3, 5)" in str(e.value) and "shape" in str(e.value)
    with pytest.raises(AssertionError, match="layer name"):
        assert_applies(THREE, unet)  # the default model's recipe: names this model does not have


def test_psnr_at_least() -> None:
    unet = tiny()
    probe = make_probe_set(unet, seed=0, n_samples=2)
    m = assert_psnr_at_least(unet, Recipe.from_specs(unet, PaletteSpec(8)), 30.0, probe)
    assert m.psnr >= 30.0
    with pytest.raises(AssertionError) as e:
        assert_psnr_at_least(unet, Recipe.from_specs(unet, PaletteSpec(1)), m.psnr, probe)
    assert "measured PSNR" in str(e.value) and f"< {m.psnr:g} dB" in str(e.value) and "#" in str(e.value)


def test_same_recipe() -> None:
    a = Recipe.load(THREE)
    assert_same_recipe(THREE, dataclasses.replace(a, predicted_psnr=a.predicted_psnr + 0.05, info={}))
    with pytest.raises(AssertionError, match="predicted PSNR"):
        assert_same_recipe(a, dataclasses.replace(a, predicted_psnr=a.predicted_psnr + 0.5), psnr_tol_db=0.1)
    name = next(n for n, s in a.layers.items() if s is not None and s.nbits != 6)
    with pytest.raises(AssertionError) as e:
        assert_same_recipe(a, dataclasses.replace(a, layers={**a.layers, name: PaletteSpec(6)}))
    row = next(line for line in str(e.value).splitlines() if line.startswith(name + " "))
    assert a.layers[name].label in row and "6b" in row


def test_golden_file_after_reallocation(tmp_path: Path) -> None:
    unet = load_model("default").model
    sens = Sensitivity.load(RECIPES / "default_sensitivity.json")
    golden = tmp_path / "golden.json"
    with pytest.raises(AssertionError, match="update=True"):
        assert_matches_golden(Recipe.from_specs(unet, PaletteSpec(4)), golden)
    first = allocate_bits(unet, budget_bits=3, sensitivity=sens, seed=0, progress=False)
    assert_matches_golden(first, golden, update=True)
    again = allocate_bits(unet, budget_bits=3, sensitivity=sens, seed=0, progress=False)
    assert_matches_golden(again, golden)
    again.save(tmp_path / "again.json")
    assert_matches_golden(tmp_path / "again.json", golden)

    lower = allocate_bits(unet, budget_bits=2.5, sensitivity=sens, seed=0, progress=False)
    with pytest.raises(AssertionError) as e:
        assert_matches_golden(lower, golden)
    changed = next(n for n in first.layers if first.layers[n] != lower.layers[n])
    assert changed in str(e.value) and "size" in str(e.value)

    relabelled = dataclasses.replace(again, info={**again.info, "note": "x"})
    with pytest.raises(AssertionError) as e:
        assert_matches_golden(relabelled, golden)
    assert "line" in str(e.value) and "the plan is the same" in str(e.value)
    assert json.loads(golden.read_text()) == first.to_dict()


def readme_golden_example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    found = [b for b in blocks if b.startswith("# tests/test_golden_recipe.py")]
    assert len(found) == 1, "README.md has no golden-recipe test example"
    return found[0]


def test_the_readme_golden_recipe_example(tmp_path: Path, monkeypatch) -> None:
    """The README's copyable test file: it writes its golden file, then passes, then fails naming
    the layer when the golden file says otherwise."""
    path = tmp_path / "test_golden_recipe.py"
    path.write_text(readme_golden_example())
    spec = importlib.util.spec_from_file_location("readme_golden_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    golden = tmp_path / "unet_recipe.golden.json"

    monkeypatch.setenv("UPDATE_GOLDEN", "1")
    module.test_golden_recipe()
    assert golden.exists()
    monkeypatch.delenv("UPDATE_GOLDEN")
    module.test_golden_recipe()

    recipe = Recipe.load(golden)
    name = next(n for n, s in recipe.layers.items() if s is not None and s.nbits != 8)
    dataclasses.replace(recipe, layers={**recipe.layers, name: PaletteSpec(8)}).save(golden)
    with pytest.raises(AssertionError) as e:
        module.test_golden_recipe()
    assert name in str(e.value) and "8b" in str(e.value)
