"""Diffusion transformers end to end without user inputs (issue 20): for a tiny random model of each
class, the data-free probe, `allocate_bits(budget_bits=4)` with its prediction checked against
palette's own measurement on the probe set, and `palette allocate | analyze --model <pipeline
folder> --subfolder transformer`. (Their split-einsum rewrite and Core ML export: test_ane_dit.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from torch import nn

from palette import PaletteSpec, allocate_bits, probe_sensitivity
from palette.cli import EXIT_USAGE, main
from palette.probe import Sensitivity, make_probe_set, measure
from palette.probe.inputs import DEFAULT_SAMPLES
from palette.recipe import Recipe
from palette.testing import assert_fits_budget

from dits import CLASSES, LATENT, tiny

MAX_GAP_DB = 1.5  # |measured - predicted| PSNR on the probe set (issue 20)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cls", list(CLASSES))
def test_data_free_allocation_measures_what_it_predicts(cls: str) -> None:
    name = CLASSES[cls]
    model = tiny(name)
    assert type(model).__name__ == cls
    before = state(model)
    # What inputs=None synthesises; FLUX at a 8x8 latent instead of its pipeline's 128x128 (4096
    # tokens, minutes even for the tiny model): the same data-free synthesis, given as a ProbeSet.
    probe = make_probe_set(model, sample_size=LATENT.get(name))
    inputs = probe if name in LATENT else None
    sens = probe_sensitivity(model, inputs, progress=False)
    assert sens.inputs_description == probe.description
    assert probe.description.startswith(f"synthesised for {cls}: {DEFAULT_SAMPLES} noisy latent-like samples")
    assert all(np.nanmin(e) >= 0 and np.isfinite(np.nanmax(e)) for e in sens.errors.values())

    recipe = allocate_bits(model, budget_bits=4, sensitivity=sens, inputs=inputs, progress=False)
    assert_fits_budget(recipe, budget_bits=4)
    assert set(recipe.layers) == set(sens.layers) and recipe.palettized
    assert "measured on the probe set" in recipe.info["calibration"]

    measured = measure(model, recipe, probe).psnr  # palette's measurement: recipe on vs off
    additive = recipe.info["additive_psnr"]  # the probe's own first-order prediction, before calibration
    print(f"{cls}: measured {measured:.3f} dB, predicted {recipe.predicted_psnr} dB, additive {additive} dB "
          f"(|measured - additive| {abs(measured - additive):.2f} dB)")
    assert abs(measured - recipe.predicted_psnr) <= MAX_GAP_DB
    assert abs(measured - additive) <= MAX_GAP_DB
    uniform = measure(model, {n: PaletteSpec(4) for n in recipe.layers}, probe).psnr
    assert measured > uniform + 1.0, (measured, uniform)  # the allocation is worth its bits
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_allocate_bits_with_nothing_but_a_budget() -> None:
    """No inputs, no sensitivity: the same recipe as the data-free probe allocated in two steps."""
    model = tiny("sana")
    recipe = allocate_bits(model, budget_bits=3, n_probes=4, progress=False)
    sens = probe_sensitivity(model, n_probes=4, progress=False)
    assert recipe.layers == allocate_bits(model, budget_bits=3, sensitivity=sens, progress=False).layers
    assert_fits_budget(recipe, budget_bits=3)
    assert recipe.info["probe_inputs"] == make_probe_set(model).description


def pipeline_folder(root: Path) -> Path:
    """A diffusers pipeline folder holding a tiny SANA transformer and its scheduler (flow shift 2)."""
    tiny("sana").save_pretrained(root / "transformer")
    scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=2.0,
                                                      prediction_type="flow_prediction")
    scheduler.save_pretrained(root / "scheduler")
    index = {"_class_name": "SanaPipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "SanaTransformer2DModel"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_cli_allocates_and_analyzes_the_transformer_of_a_pipeline_folder(tmp_path, capsys) -> None:
    root = pipeline_folder(tmp_path / "pipe")
    common = ["--model", str(root), "--subfolder", "transformer", "--samples", "2", "--probes", "2", "-q"]
    out, sens_out = tmp_path / "recipe.json", tmp_path / "sens.json"
    assert main(["allocate", *common, "--budget-bits", "4", "-o", str(out), "--plot", "none", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    recipe = Recipe.load(out)
    assert result["path"] == str(out) and result["size_bytes"] == recipe.size_bytes
    assert_fits_budget(recipe, budget_bits=4)
    assert recipe.palettized
    # probed data-free with the pipeline's own scheduler, and calibrated on that probe set
    assert "SanaTransformer2DModel" in recipe.info["probe_inputs"]
    assert "DPMSolverMultistepScheduler: shift 2" in recipe.info["probe_inputs"]
    assert "measured on the probe set" in recipe.info["calibration"]

    assert main(["analyze", *common, "-o", str(sens_out)]) == 0
    assert set(Sensitivity.load(sens_out).layers) == set(recipe.layers)

    # exported with data-free example inputs, read back and checked bit for bit against the recipe
    package = tmp_path / "transformer.mlpackage"
    capsys.readouterr()
    assert main(["export", "--model", str(root), "--subfolder", "transformer", "--recipe", str(out), "-o", str(package),
                 "-q", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["verified"] and exported["palettized"] == len(recipe.palettized) and package.is_dir()

    capsys.readouterr()
    code = main(["allocate", "--model", str(root), "--subfolder", "transfomer", "--budget-bits", "4",
                 "-o", str(tmp_path / "other.json"), "--plot", "none"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and err.count("\n") == 1, err
    assert "--subfolder transfomer" in err and "its components: transformer" in err, err
    assert not (tmp_path / "other.json").exists()
