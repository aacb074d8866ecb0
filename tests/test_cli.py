"""The `palette` command line, run in-process on tiny saved models (and once as a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palette.cli import build_parser, main
from palette.recipe import Recipe

FAST = ["-q", "--nbits", "2", "4", "--granularity", "per_tensor", "--samples", "2", "--probes", "2"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    """A tiny diffusers UNet saved with save_pretrained, inside a pipeline-like folder."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    root = tmp_path_factory.mktemp("pipe")
    unet.save_pretrained(root / "unet")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root / "unet"


@pytest.fixture(scope="module")
def sens_file(unet_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sens") / "sens.json"
    assert main(["analyze", "--model", str(unet_dir), "-o", str(path), *FAST]) == 0
    return path


@pytest.fixture(scope="module")
def recipe_file(unet_dir, sens_file) -> Path:
    path = sens_file.with_name("recipe.json")
    code = main(["allocate", "--model", str(unet_dir), "--sensitivity", str(sens_file), "--budget-bits", "3",
                 "-o", str(path), "--plot", "none", "-q"])
    assert code == 0
    return path


def test_help_lists_every_subcommand_and_reads_well(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("analyze", "allocate", "apply", "export", "verify", "diff", "compare", "bench", "demo"):
        assert f"\n    {cmd} " in out
    assert "examples:" in out and "(default: None)" not in out
    for cmd in ("analyze", "allocate", "apply", "export", "verify", "diff", "compare", "bench", "demo"):
        help_text = build_parser()._subparsers._group_actions[0].choices[cmd].format_help()
        assert "(default: None)" not in help_text and "(default: False)" not in help_text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["allocate", "--model", "minilm"], "one of the arguments --budget-gb --budget-bits is required"),
        (["allocate", "--model", "minilm", "--budget-bits", "-1"], "must be a positive number"),
        (["allocate", "--model", "minilm", "--budget-gb", "1", "--budget-bits", "3"], "not allowed with"),
        (["analyze", "--model", "minilm", "--nbits", "5"], "invalid choice"),
        (["analyze", "--model", "minilm", "--samples", "0"], "must be >= 1"),
        (["allocate", "--model", "minilm", "--budget-bits", "3", "--refine", "-1"], "must be >= 0"),
        (["analyze"], "--model"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "--model", "no/such/dir/here"], "no such file or directory"),
        (["analyze", "--model", "weights.safetensors"], "no such file"),
        (["allocate", "--model", "{unet}", "--budget-bits", "3", "--sensitivity", "missing.json"], "no such file"),
        (["allocate", "--model", "{unet}", "--budget-bits", "0.5", "--sensitivity", "{sens}"],
         "below the smallest size"),
        (["analyze", "--model", "{pipe}"], "choose a component with --subfolder (unet)"),
        (["analyze", "--model", "{unet}", "--config", "x.json"], "--config applies to a .safetensors"),
        (["export", "--model", "{unet}", "--recipe", "{recipe}", "-o", "x.onnx"], "must end in .mlpackage"),
        (["bench", "nosuchbench"], "unknown benchmark"),
    ],
)
def test_bad_inputs_exit_2_saying_what_to_do(capsys, monkeypatch, tmp_path, unet_dir, sens_file, recipe_file,
                                            argv, message) -> None:
    monkeypatch.chdir(tmp_path)
    subs = {"unet": unet_dir, "pipe": unet_dir.parent, "sens": sens_file, "recipe": recipe_file}
    code, _, err = run(capsys, *[a.format(**subs) for a in argv])
    assert code == 2
    assert message in err.partition("palette: error: ")[2]


def test_hub_id_without_network_fails_clearly() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "palette", "analyze", "--model", "stabilityai/stable-diffusion-2-1-base",
         "--subfolder", "unet"], capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    assert "palette: error:" in proc.stderr and "pass the local directory with --model" in proc.stderr


def test_analyze_writes_sensitivity_json(sens_file) -> None:
    from palette.probe import Sensitivity

    sens = Sensitivity.load(sens_file)
    assert sens.method == "fast" and len(sens.layers) > 10
    assert {s.label for s in sens.specs} == {"2b", "4b"}


def test_allocate_json_matches_the_recipe_and_measures(unet_dir, sens_file, tmp_path, capsys) -> None:
    code, out, _ = run(capsys, "allocate", "--model", unet_dir, "--sensitivity", sens_file, "--budget-bits", "3",
                       "-o", tmp_path / "r.json", "--plot", "none", "--measure", "--samples", "2", "--json", "-q")
    result = json.loads(out)
    recipe = Recipe.load(tmp_path / "r.json")
    assert code == 0
    assert result["size_bytes"] == recipe.size_bytes and result["bits_per_weight"] <= 3.0
    assert result["predicted_psnr"] == pytest.approx(recipe.predicted_psnr)
    assert 0 < result["measured"]["psnr"] < 100 and set(result["specs"]) <= {"2b", "4b", "16-bit"}


def test_allocate_refine_records_its_rounds(unet_dir, sens_file, tmp_path, capsys) -> None:
    """--refine N: the measured correction runs on the sensitivity's own probe set; the recipe
    records its rounds and is calibrated by them, within the budget."""
    code, _, _ = run(capsys, "allocate", "--model", unet_dir, "--sensitivity", sens_file, "--budget-bits", "3",
                     "-o", tmp_path / "r.json", "--plot", "none", "--samples", "2", "--refine", "1", "-q")
    recipe = Recipe.load(tmp_path / "r.json")
    assert code == 0 and recipe.bits_per_weight <= 3.0
    refine = recipe.info["refine"]
    assert refine["forward_passes"] >= 2 and recipe.predicted_psnr >= refine["first_measured_psnr"]


def test_allocate_budget_gb_text_output(unet_dir, sens_file, tmp_path, capsys) -> None:
    code, out, _ = run(capsys, "allocate", "--model", unet_dir, "--sensitivity", sens_file, "--budget-gb", "0.0006",
                       "-o", tmp_path / "r.json", "--plot", "none", "-q")
    assert code == 0
    assert Recipe.load(tmp_path / "r.json").size_bytes <= 600_000
    assert "bits per weight" in out and "predicted latent PSNR" in out and "wrote" in out


def test_allocate_writes_the_plot(unet_dir, sens_file, tmp_path, capsys) -> None:
    pytest.importorskip("palette.plot")
    code, out, _ = run(capsys, "allocate", "--model", unet_dir, "--sensitivity", sens_file, "--budget-bits", "3",
                       "-o", tmp_path / "r.json", "--samples", "2", "--plot-bits", "3", "--json", "-q")
    assert code == 0 and json.loads(out)["plot"] == str(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_apply_saves_a_from_pretrained_model_with_the_palettes(unet_dir, recipe_file, tmp_path, capsys) -> None:
    from diffusers import UNet2DConditionModel

    code, out, _ = run(capsys, "apply", "--model", unet_dir, "--recipe", recipe_file, "-o", tmp_path / "pal", "-q")
    assert code == 0 and "palettized" in out
    original = UNet2DConditionModel.from_pretrained(unet_dir)
    palettes = Recipe.load(recipe_file).palettes(original)
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "pal")
    modules = dict(saved.named_modules())
    for name, pal in palettes.items():
        assert torch.equal(modules[name].weight.detach().half(), pal.dequantize().reshape(modules[name].weight.shape))


def test_applied_folder_carries_its_palettes_into_export(unet_dir, recipe_file, tmp_path, capsys) -> None:
    """`apply` writes the palettes beside the weights; `export` / `verify` of that folder need no
    recipe, and the palettes file has the same bytes from the API and the CLI."""
    from diffusers import UNet2DConditionModel

    from palette import export_palettes, palettize

    folder = tmp_path / "pal"
    assert main(["apply", "--model", str(unet_dir), "--recipe", str(recipe_file), "-o", str(folder), "-q"]) == 0
    api = tmp_path / "api.safetensors"
    model = UNet2DConditionModel.from_pretrained(unet_dir)
    palettize(model, Recipe.load(recipe_file), progress=False)
    export_palettes(model, api)
    assert (folder / "palettes.safetensors").read_bytes() == api.read_bytes()
    cli = tmp_path / "cli.safetensors"
    assert main(["export", "--model", str(unet_dir), "--recipe", str(recipe_file), "-o", str(cli), "-q"]) == 0
    assert cli.read_bytes() == api.read_bytes()
    capsys.readouterr()
    code, out, err = run(capsys, "export", "--model", folder, "-o", tmp_path / "u.mlpackage", "--json", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert code == 0 and result["verified"] is True
    assert result["palettized"] == len(Recipe.load(recipe_file).palettized)
    code, out, _ = run(capsys, "verify", tmp_path / "u.mlpackage", "--model", folder, "--json", "-q")
    assert code == 0 and json.loads(out)["palettized"] == result["palettized"]
    code, _, err = run(capsys, "export", "--model", unet_dir, "-o", tmp_path / "x.mlpackage", "-q")
    assert code == 2 and "carries no palettes: pass --recipe" in err


def test_export_and_verify_safetensors(unet_dir, recipe_file, sens_file, tmp_path, capsys) -> None:
    path = tmp_path / "unet_palettes.safetensors"
    code, out, _ = run(capsys, "export", "--model", unet_dir, "--recipe", recipe_file, "-o", path, "--json", "-q")
    assert code == 0 and json.loads(out)["file_bytes"] == path.stat().st_size
    code, out, _ = run(capsys, "verify", path, "--model", unet_dir, "--recipe", recipe_file, "--json", "-q")
    assert code == 0 and json.loads(out)["verified"] is True
    other = tmp_path / "other.json"
    assert main(["allocate", "--model", str(unet_dir), "--sensitivity", str(sens_file), "--budget-bits", "2.5",
                 "-o", str(other), "--plot", "none", "-q"]) == 0
    code, _, err = run(capsys, "verify", path, "--model", unet_dir, "--recipe", other, "-q")
    assert code == 2 and "verification failed" in err


def test_export_and_verify_mlpackage(unet_dir, recipe_file, tmp_path, capsys) -> None:
    path = tmp_path / "unet.mlpackage"
    code, out, _ = run(capsys, "export", "--model", unet_dir, "--recipe", recipe_file, "-o", path,
                       "--max-chunk-bytes", "200000", "--json", "-q")
    result = json.loads(out)
    assert code == 0 and result["verified"] is True
    assert result["stored_palettized_bytes"] == result["predicted_palettized_bytes"]
    assert len(result["chunks"]) >= 2 and all(Path(p).exists() for p in result["chunks"])
    code, out, _ = run(capsys, "verify", path, "--model", unet_dir, "--recipe", recipe_file, "-q")
    assert code == 0 and "verified bit-exact" in out


def test_safetensors_with_config_is_the_same_model(unet_dir, sens_file, capsys) -> None:
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    code, out, _ = run(capsys, "analyze", "--model", weights, "--config", unet_dir / "config.json",
                       "-o", sens_file.with_name("again.json"), "--json", "--top", "3", *FAST)
    result = json.loads(out)
    assert code == 0 and len(result["most_sensitive"]) == 3
    assert Path(result["path"]).read_text() == sens_file.read_text()  # same weights and seed, same file


def test_transformers_directory(tmp_path, capsys) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=128)).save_pretrained(tmp_path / "bert")
    code, out, _ = run(capsys, "analyze", "--model", tmp_path / "bert", "-o", tmp_path / "s.json", "--json", *FAST)
    assert code == 0 and json.loads(out)["layers"] == 7  # q, k, v, o, intermediate, output, pooler


def test_vae_decoder(tmp_path, capsys) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  sample_size=32).save_pretrained(tmp_path / "vae")
    code, out, _ = run(capsys, "analyze", "--model", tmp_path / "vae", "-o", tmp_path / "s.json", "--json", *FAST)
    result = json.loads(out)
    assert code == 0 and all(r["layer"].startswith(("decoder.", "post_quant_conv")) for r in result["most_sensitive"])


def test_bench_lists_the_benchmarks(capsys) -> None:
    code, out, _ = run(capsys, "bench", "--list", "--json")
    assert code == 0 and "cluster" in json.loads(out)["benchmarks"]


def test_console_script_and_module_entry_point() -> None:
    exe = Path(sys.executable).with_name("palette")
    for cmd in ([str(exe)], [sys.executable, "-m", "palette"]):
        proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("palette ")

