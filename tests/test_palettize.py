"""Applying palettes to a model: targets, mappings by name and regex, in place, never half-done."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from palette import PaletteSpec, keep_original, palettize, resolve_specs, target_layers


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3),  # 864 weights: below the default threshold
        nn.Conv2d(32, 64, 3),
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.Conv1d(8, 16, 16),
        nn.LayerNorm(16),
    )


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_targets_are_linear_and_conv_above_the_threshold() -> None:
    m = small_model()
    assert list(target_layers(m)) == ["1", "3", "4"]
    assert list(target_layers(m, min_numel=0)) == ["0", "1", "3", "4"]


def test_palettize_in_place_returns_palettes() -> None:
    m = small_model()
    before = weights(m)
    pals = palettize(m, PaletteSpec(nbits=2), progress=False)
    assert set(pals) == {"1", "3", "4"}
    for name, pal in pals.items():
        w = dict(m.named_modules())[name].weight
        assert torch.equal(w, pal.dequantize().float())
        assert w.unique().numel() <= 4
    assert torch.equal(m[0].weight, before["0.weight"])  # below threshold: untouched
    assert torch.equal(m[1].bias, before["1.bias"])  # biases untouched


def test_mapping_by_name_and_regex_with_none_keeping_16_bits() -> None:
    m = small_model()
    mapping = {"3": None, r"\d": PaletteSpec(nbits=3), "4": PaletteSpec(nbits=1)}
    specs = resolve_specs(m, mapping)
    assert specs == {"1": PaletteSpec(nbits=3), "4": PaletteSpec(nbits=1)}
    before = weights(m)
    palettize(m, mapping, progress=False)
    assert torch.equal(m[3].weight, before["3.weight"])
    assert m[4].weight.unique().numel() <= 2


def test_unknown_layer_names_are_an_error() -> None:
    m = small_model()
    with pytest.raises(ValueError, match=r"match no target layer.*'down\.9'"):
        palettize(m, {"down.9": PaletteSpec()}, progress=False)


def test_bad_layer_leaves_the_whole_model_untouched() -> None:
    m = small_model()
    with torch.no_grad():
        m[4].weight[0, 0, 0] = float("nan")
    before = weights(m)
    with pytest.raises(ValueError, match="4: 1 NaN/Inf"):
        palettize(m, PaletteSpec(nbits=2), progress=False)
    after = weights(m)
    assert all(torch.equal(before[k], after[k]) for k in before if k != "4.weight")
    assert torch.equal(after["4.weight"].nan_to_num(), before["4.weight"].nan_to_num())


def test_group_size_must_divide_every_selected_layer() -> None:
    m = small_model()
    before = weights(m)
    with pytest.raises(ValueError, match="group_size=32 does not divide its 16 output channels"):
        palettize(m, PaletteSpec(4, "per_grouped_channel", 32), progress=False)
    assert all(torch.equal(before[k], v) for k, v in weights(m).items())


def test_keep_original_restores_on_exception_and_interrupt() -> None:
    m = small_model()
    before = weights(m)
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with keep_original(m):
                palettize(m, PaletteSpec(nbits=1), progress=False)
                raise exc()
        assert all(torch.equal(before[k], v) for k, v in weights(m).items())


def test_palettized_per_call_computes_as_palettized_and_leaves_the_weights() -> None:
    """Measuring through per-call palettization gives exactly the outputs of the model with the
    palettes written in (a weight shared by two layers included), keeps no copy of the weights,
    and leaves every weight as it was, also when the forward raises."""
    from palette.palettize import palettized, palettized_per_call
    from palette.recipe import as_recipe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128))
    model[4].weight = model[2].weight  # tied
    x = torch.randn(5, 64)
    palettes = as_recipe(model, PaletteSpec(nbits=2)).palettes(model)
    before = weights(model)
    with torch.no_grad(), palettized(model, palettes):
        expected = model(x)
    with torch.no_grad(), palettized_per_call(model, palettes):
        got = model(x)
        assert all(torch.equal(v, before[k]) for k, v in weights(model).items())  # between calls: originals
    assert torch.equal(got, expected) and not torch.equal(got, model(x))
    with pytest.raises(RuntimeError), palettized_per_call(model, palettes):
        model(torch.randn(5, 63))
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())
