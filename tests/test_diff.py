"""Recipe.diff and `palette diff`: empty for equivalent recipes (exit 0), every changed layer with
its old and new spec and byte delta (exit 1), one-line errors for bad files (exit 2)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

import palette
from palette.cli import main
from palette.recipe import Recipe
from palette.spec import PaletteSpec

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
GOLDEN = RECIPES / "default_3bit.json"


def stored(spec: PaletteSpec | None, shape: tuple[int, ...]) -> int:
    return 2 * math.prod(shape) if spec is None else spec.nbytes(shape)


def edited(recipe: Recipe, **layers: PaletteSpec | None) -> Recipe:
    return dataclasses.replace(recipe, layers={**recipe.layers, **layers})


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["diff", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_identical_recipes_have_an_empty_diff_and_exit_0(tmp_path: Path, capsys) -> None:
    a = Recipe.load(GOLDEN)
    copy = tmp_path / "copy.json"
    # metadata that does not change the stored model is not a difference
    dataclasses.replace(a, info={"command": "elsewhere"}, palette_version="9.9").save(copy)
    d = a.diff(Recipe.load(copy))
    assert not d and d.equivalent
    assert (d.changed, d.only_a, d.only_b, d.other) == ((), (), (), ())
    assert palette.diff(a, a).to_dict()["equivalent"] is True
    assert "equivalent" in str(d)
    code, out, err = run(capsys, str(GOLDEN), str(copy))
    assert code == 0 and "equivalent" in out and err == ""
    code, out, _ = run(capsys, str(GOLDEN), str(copy), "--json")
    assert code == 0 and json.loads(out)["equivalent"] is True and json.loads(out)["changed"] == []


def test_a_one_layer_change_is_reported_with_both_specs_and_the_byte_delta(tmp_path: Path, capsys) -> None:
    a = Recipe.load(GOLDEN)
    name = next(n for n, s in a.layers.items() if s is not None and s.nbits != 8)
    old, new = a.layers[name], PaletteSpec(8)
    b = edited(a, **{name: new})
    path = tmp_path / "b.json"
    b.save(path)
    delta = stored(new, a.shapes[name]) - stored(old, a.shapes[name])
    assert delta != 0

    d = a.diff(Recipe.load(path))
    assert d and len(d.changed) == 1 and not d.only_a and not d.only_b
    (c,) = d.changed
    assert (c.name, c.old, c.new, c.delta_bytes) == (name, old, new, delta)
    assert d.b.size_bytes - d.a.size_bytes == delta
    assert d.b.bits_per_weight > d.a.bits_per_weight

    code, out, err = run(capsys, str(GOLDEN), str(path))
    assert code == 1 and err == ""
    row = next(line for line in out.splitlines() if line.startswith(name + " "))
    assert old.label in row and "8b" in row and f"{delta:+,}" in row
    code, out, _ = run(capsys, str(GOLDEN), str(path), "--json")
    got = json.loads(out)
    assert code == 1 and got["equivalent"] is False
    assert [(c["layer"], c["old_label"], c["new_label"], c["delta_bytes"]) for c in got["changed"]] == [
        (name, old.label, "8b", delta)]
    assert got["totals"]["delta"]["size_bytes"] == delta


def test_layers_in_one_recipe_only_and_a_dropped_palette(tmp_path: Path) -> None:
    a = Recipe.load(GOLDEN)
    names = [n for n, s in a.layers.items() if s is not None]
    gone, kept = names[0], names[1]
    b = dataclasses.replace(a, layers={n: s for n, s in a.layers.items() if n != gone},
                            shapes={n: s for n, s in a.shapes.items() if n != gone})
    b = edited(b, **{kept: None})
    d = a.diff(b)
    assert [c.name for c in d.only_a] == [gone] and d.only_a[0].old == a.layers[gone]
    assert [c.name for c in d.changed] == [kept] and d.changed[0].new is None
    assert d.changed[0].delta_bytes == stored(None, a.shapes[kept]) - stored(a.layers[kept], a.shapes[kept])
    back = b.diff(a)
    assert [c.name for c in back.only_b] == [gone]
    text = str(d)
    assert gone in text and "absent" in text and "16-bit" in text


def test_predicted_psnr_counts_only_with_a_tolerance() -> None:
    a = Recipe.load(GOLDEN)
    b = dataclasses.replace(a, predicted_psnr=a.predicted_psnr - 0.3)
    assert not a.diff(b)
    assert not a.diff(b, psnr_tol_db=0.5)
    d = a.diff(b, psnr_tol_db=0.1)
    assert d and "predicted PSNR" in d.other[0]
    with pytest.raises(ValueError, match="psnr_tol_db"):
        a.diff(b, psnr_tol_db=-1)


def test_bad_files_exit_2_with_one_line(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    edited_size = tmp_path / "edited.json"
    d = json.loads(GOLDEN.read_text())
    d["size_bytes"] += 1
    edited_size.write_text(json.dumps(d))
    cases = [tmp_path / "missing.json", tmp_path, broken, RECIPES / "default_sensitivity.json", edited_size]
    for bad in cases:
        for argv in ((str(GOLDEN), str(bad)), (str(bad), str(GOLDEN))):
            code, out, err = run(capsys, *argv)
            assert code == 2 and out == "", bad
            assert len(err.strip().splitlines()) == 1 and err.startswith("palette: ") and "Traceback" not in err
            assert bad.name in err
    with pytest.raises(SystemExit) as e:
        main(["diff", str(GOLDEN)])
    assert e.value.code == 2
    capsys.readouterr()
