"""compare_recipes and `palette compare`: on the default model with the demo's three recipes it
reproduces the demo's measured PSNRs (README's reference run); pairwise PSNR, plots, sample grid,
data-free inputs, the model left unchanged, bad input refused."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from palette.allocate import allocate_bits
from palette.cli import main
from palette.compare import compare_recipes, sample_images
from palette.demo import FULL, LOW_BITS
from palette.metrics import image_psnr
from palette.models.data import held_out_captions
from palette.models.load import Loaded, load_model
from palette.models.zoo import build
from palette.probe import Sensitivity, measure
from palette.recipe import Recipe
from palette.spec import PaletteSpec

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
PNG = b"\x89PNG\r\n\x1a\n"


@functools.lru_cache(maxsize=None)
def default() -> Loaded:
    return load_model("default")


@functools.lru_cache(maxsize=None)
def demo_recipes() -> dict[str, Recipe]:
    """The demo's recipes as `palette demo` makes them (seed 0): uniform 4-bit, palette's recipe at
    uniform 4-bit's size and at LOW_BITS bits a weight, from the demo's sensitivity (shipped)."""
    unet = default().model
    sens = Sensitivity.load(RECIPES / "default_sensitivity.json")
    uniform = Recipe.from_specs(unet, PaletteSpec(4), seed=0)
    same = allocate_bits(unet, budget_gb=uniform.size_bytes / 1e9, sensitivity=sens, seed=0, progress=False)
    low = Recipe.load(RECIPES / f"default_{LOW_BITS:g}bit.json")  # the shipped recipe is the demo's
    assert not low.diff(allocate_bits(unet, budget_bits=LOW_BITS, sensitivity=sens, seed=0, progress=False))
    return {"uniform 4-bit": uniform, "palette mixed, same size": same, f"palette mixed, {LOW_BITS:g} bits": low}


def readme_demo_table() -> dict[str, tuple[float, float]]:
    """{variant: (size MB, measured dB)} from the README's reference run of `palette demo`."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```text\nvariant +bits/w +size MB +predicted +measured +images\n(.*?)```", text, re.S)
    assert block, "README has no demo table"
    rows = {}
    for line in block.group(1).splitlines():
        name, _bits, size, _pred, measured, _img = re.split(r"\s{2,}", line.strip())
        if measured != "-":
            rows[name] = (float(size), float(measured))
    return rows


def test_compare_reproduces_the_demos_measured_psnrs() -> None:
    loaded = default()
    unet = loaded.model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    probe = loaded.probe_set(FULL.samples, 0)  # the demo's probe set (seed 0)
    recipes = demo_recipes()
    again = Recipe.load(RECIPES / f"default_{LOW_BITS:g}bit.json")
    result = compare_recipes(unet, {**recipes, "3 bits, again": again}, probe)

    readme = readme_demo_table()
    assert set(recipes) == set(readme)
    for name, (size_mb, measured) in readme.items():
        got = result[name]
        assert got.psnr == pytest.approx(measured, abs=0.005), name
        assert got.size_bytes / 1e6 == pytest.approx(size_mb, abs=0.0005), name
        assert got.size_bytes == recipes[name].size_bytes and got.bits_per_weight == recipes[name].bits_per_weight
        assert len(got.per_sample_psnr) == 12 and np.mean(got.per_sample_psnr) == pytest.approx(got.psnr)
    # exactly what the demo's own measurement call gives
    same = "palette mixed, same size"
    assert result[same].psnr == measure(unet, recipes[same], probe).psnr
    # pairwise: identical outputs are far apart from nothing, different recipes are not
    low = f"palette mixed, {LOW_BITS:g} bits"
    assert result.pairwise[low]["3 bits, again"] > 150
    assert result.pairwise[low][same] < 80 and result.pairwise[same]["uniform 4-bit"] < 80
    assert set(result.pairwise["uniform 4-bit"]) == {same, low, "3 bits, again"}
    text = str(result)
    assert all(name in text for name in recipes) and f"{result[same].psnr:.2f}" in text
    assert result.to_dict()["recipes"][1]["label"] == same
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items()), "the model was changed"


def test_plot_and_sample_grid(tmp_path: Path) -> None:
    loaded = default()
    recipes = demo_recipes()
    picked = {"uniform 4-bit": recipes["uniform 4-bit"]}
    result = compare_recipes(loaded.model, picked, loaded.probe_set(1, 0))
    plot = result.plot(tmp_path / "cmp.png")
    assert plot.read_bytes()[:8] == PNG
    prompts = held_out_captions(1)
    scores = result.sample_grid(tmp_path / "grid.png", loaded.model, loaded.pipeline, prompts, steps=2, seed=3)
    assert (tmp_path / "grid.png").read_bytes()[:8] == PNG
    images = sample_images(loaded.model, loaded.pipeline, [None, picked["uniform 4-bit"]], prompts, steps=2, seed=3)
    assert scores["uniform 4-bit"] == image_psnr(images[1], images[0])
    assert list(scores) == list(picked)


def test_data_free_inputs_on_a_tiny_unet_and_bad_recipes() -> None:
    unet = build("sd15-unet", tiny=True)
    result = compare_recipes(unet, [PaletteSpec(8), PaletteSpec(2)], n_samples=2)
    assert [r.label for r in result.results] == ["recipe 1", "recipe 2"]
    assert "synthesised" in result.inputs and len(result["recipe 1"].per_sample_psnr) == 2
    assert result["recipe 1"].psnr > result["recipe 2"].psnr  # 8 bits keep more than 2
    assert result["recipe 1"].size_bytes > result["recipe 2"].size_bytes
    other = Recipe.load(RECIPES / "default_3bit.json")
    with pytest.raises(ValueError, match="layer name"):
        compare_recipes(unet, {"default": other}, n_samples=2)
    with pytest.raises(ValueError, match="at least one"):
        compare_recipes(unet, {})


def test_cli_compare(tmp_path: Path, capsys) -> None:
    """`palette compare --samples 2` measures on the demo's probe set: it gives what the recipes
    recorded (tests/test_recipes.py re-measures those) and what README quotes."""
    a, b = str(RECIPES / "default_4bit.json"), str(RECIPES / "default_3bit.json")
    code = main(["compare", "--model", "default", a, "--samples", "2", "--plot", str(tmp_path / "p.png"),
                 "--json", "-q"])
    got = json.loads(capsys.readouterr().out)
    assert code == 0 and (tmp_path / "p.png").read_bytes()[:8] == PNG
    assert [r["label"] for r in got["recipes"]] == ["default_4bit.json"] and got["pairwise_psnr"] == {
        "default_4bit.json": {}}
    loaded = load_model("default")
    recorded = Recipe.load(a).info["measured"]
    assert recorded["samples"] == 2
    fresh = measure(loaded.model, Recipe.load(a), loaded.probe_set(2, recorded["seed"])).psnr
    assert got["recipes"][0]["psnr"] == fresh  # compare measures exactly as measure() does
    assert fresh == pytest.approx(recorded["psnr"], abs=0.05)  # and as recorded (test_recipes' BLAS tolerance)
    quoted = re.search(r"the 4-bit and 3-bit recipes above give (\d+\.\d+) and (\d+\.\d+) dB",
                       " ".join((ROOT / "README.md").read_text().split()))
    assert quoted, "README does not quote palette compare's figures"
    assert quoted.group(1) == f"{got['recipes'][0]['psnr']:.2f}"
    assert quoted.group(2) == f"{Recipe.load(b).info['measured']['psnr']:.2f}"
    for argv in ([a, str(tmp_path / "missing.json")], [a, a], [a, "--plot", str(tmp_path / "p.jpg")],
                 [a, str(RECIPES / "minilm_3bit.json")]):
        code = main(["compare", "--model", "default", "-q", *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("palette: ") and len(err.strip().splitlines()) == 1, argv
