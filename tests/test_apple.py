"""Apple's ml-stable-diffusion flow: recipes it applies in full (the APPLE candidates), and to_apple
saying exactly what its apply step would drop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from palette import APPLE, PaletteSpec, Recipe, allocate_bits
from palette.cli import main
from palette.recipe import APPLE_NBITS


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 512),           # 32,768 weights: at or under 1e5, Apple leaves it at fp16
        nn.GELU(),
        nn.Linear(512, 512),          # 262,144
        nn.GELU(),
        nn.Linear(512, 256),          # 131,072
        nn.GELU(),
        nn.Linear(256, 64),           # 16,384
    ).eval()


INPUTS = [(torch.randn(16, 64, generator=torch.Generator().manual_seed(1)),)]


def apple_rule_size(m: nn.Module, entry: dict[str, int]) -> int:
    """The bytes of the model Apple's apply step makes: per-tensor palettes (indices + 2^n fp16 LUT
    entries) for the named Linear/Conv2d weights above 1e5 elements, everything else at fp16."""
    total = 0
    modules = dict(m.named_modules())
    for name, p in m.named_parameters():
        layer, _, kind = name.rpartition(".")
        nbits = entry.get(layer, 16) if kind == "weight" else 16
        big = isinstance(modules[layer], (nn.Linear, nn.Conv2d)) and p.numel() > 1e5
        if nbits == 16 or not big:
            total += 2 * p.numel()
        else:
            total += math.ceil(p.numel() * nbits / 8) + 2 * (1 << nbits)
    return total


@pytest.mark.parametrize("bits", [2.5, 4.0])
def test_apple_preset_recipe_is_applied_in_full(bits: float) -> None:
    m = model()
    recipe = allocate_bits(m, budget_bits=bits, inputs=INPUTS, candidates=APPLE, progress=False)
    assert set(recipe.layers) == {"2", "4"}  # only the weights above 1e5 compete
    assert recipe.palettized
    for name, spec in recipe.palettized.items():
        assert math.prod(recipe.shapes[name]) > 1e5
        assert spec.granularity == "per_tensor" and spec.cluster_dim == 1 and not spec.per_channel_scale
        assert spec.nbits in APPLE_NBITS
    apple = recipe.to_apple(model_version="org/model")
    assert apple["model_version"] == "org/model"
    (entry,) = apple["recipes"].values()
    assert {n: b for n, b in entry.items() if b != 16} == {n: s.nbits for n, s in recipe.palettized.items()}
    assert recipe.size_bytes == recipe.apple_size_bytes() == apple_rule_size(m, entry)


def test_to_apple_says_what_apples_flow_would_drop() -> None:
    m = model()
    recipe = Recipe.from_specs(m, {"0": PaletteSpec(4), "2": PaletteSpec(2), "6": PaletteSpec(6)})
    extra = (2 * 64 * 512 - PaletteSpec(4).nbytes((512, 64))) + (2 * 64 * 256 - PaletteSpec(6).nbytes((64, 256)))
    with pytest.raises(ValueError, match=rf"leave 2 palettized layer\(s\) of this recipe at fp16 \(0, 6\), "
                                         rf"{extra:,} B more"):
        recipe.to_apple()
    assert recipe.apple_size_bytes() == recipe.size_bytes + extra
    with pytest.raises(ValueError, match="no equivalent in Apple's recipe format"):
        Recipe.from_specs(m, {"2": PaletteSpec(3)}).to_apple()


def test_cli_apple_json(tmp_path, monkeypatch) -> None:
    """`palette allocate --apple-json` on a real small model: the JSON names only layers Apple applies."""
    out = tmp_path / "r.json"
    apple = tmp_path / "apple.json"
    code = main(["allocate", "--model", "minilm", "--budget-bits", "4", "--apple-json", str(apple),
                 "--model-version", "sentence-transformers/all-MiniLM-L6-v2", "--samples", "2", "--probes", "2",
                 "--plot", "none", "-q", "-o", str(out)])
    assert code == 0
    recipe = Recipe.load(out)
    data = json.loads(apple.read_text())
    assert data["model_version"] == "sentence-transformers/all-MiniLM-L6-v2"
    (entry,) = data["recipes"].values()
    assert set(entry) == set(recipe.layers) and all(math.prod(s) > 1e5 for s in recipe.shapes.values())
    assert recipe.size_bytes == recipe.apple_size_bytes()
    assert main(["allocate", "--model", "minilm", "--budget-bits", "4", "--apple-json", str(apple),
                 "--nbits", "3", "-q", "-o", str(out)]) == 2
