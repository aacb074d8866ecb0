"""One budget for a whole pipeline: the pipeline as one module, joint allocation, PipelineRecipe."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from palette import Candidates, allocate_bits, probe_sensitivity
from palette.allocate import PSNR_DIGITS
from palette.metadata import carries
from palette.metrics import significant
from palette.pipeline import PipelineRecipe, pipeline_model
from palette.probe.pipeline_inputs import PipelineOutput
from palette.recipe import Recipe, target_layers

CANDS = Candidates(nbits=(2, 4), granularities=("per_tensor",), min_numel=256)


def tiny_pipeline(seed: int = 0) -> dict:
    """A random tiny pipeline: BERT-like text encoder, conditional UNet, VAE, MiniLM's tokenizer
    and the default model's scheduler."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BertConfig, BertModel

    from palette.models.default import make_scheduler
    from palette.models.minilm import load_minilm

    tokenizer = load_minilm()[1]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        te = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)).eval()
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=8).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,),
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                            norm_num_groups=8, sample_size=8).eval()
    return {"text_encoder": te, "unet": unet, "vae": vae, "tokenizer": tokenizer, "scheduler": make_scheduler(),
            "guidance_scale": 2.0, "max_tokens": 8}


def state(pipe: dict) -> list:
    out = []
    for name in ("text_encoder", "unet", "vae"):
        m = pipe[name]
        out.append(({k: v.clone() for k, v in m.state_dict().items()}, [x.training for x in m.modules()],
                    [p.requires_grad for p in m.parameters()],
                    sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())))
    return out


def same_state(a: list, b: list) -> bool:
    return all(sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and ta == tb and ra == rb
               and ha == hb for (sa, ta, ra, ha), (sb, tb, rb, hb) in zip(a, b))


@pytest.fixture(scope="module")
def allocated():
    pipe = tiny_pipeline()
    before = state(pipe)
    rec = allocate_bits(pipe, budget_bits=3.0, candidates=CANDS, n_probes=2, seed=0, progress=False,
                        n_samples=8, inputs=["a red circle", "a blue square"])
    return pipe, before, rec


def test_joint_recipe_fits_the_budget_and_leaves_the_pipeline_untouched(allocated) -> None:
    pipe, before, rec = allocated
    assert isinstance(rec, PipelineRecipe)
    assert set(rec.components) == {"text_encoder", "unet", "vae_decoder"}
    model = pipeline_model(pipe)
    targets = CANDS.layers(model)
    numel = sum(m.weight.numel() for m in targets.values())
    capacity = Recipe.dense(model, targets).fixed_bytes + int(3.0 * numel / 8)
    assert rec.size_bytes <= capacity
    assert rec.size_bytes == sum(r.size_bytes for r in rec.components.values())
    assert abs(rec.bits_per_weight - 3.0) < 0.05  # the knapsack spends the budget
    assert {n for r in rec.components.values() for n in r.palettized}  # something is palettized
    assert rec.predicted_psnr is not None and math.isfinite(rec.predicted_psnr)
    assert same_state(before, state(pipe))


def test_component_recipes_apply_to_their_components(allocated) -> None:
    _, _, rec = allocated
    pipe = tiny_pipeline()
    rec.apply(pipe)
    parts = {"text_encoder": pipe["text_encoder"], "unet": pipe["unet"], "vae_decoder": pipe["vae"]}
    for comp, recipe in rec.components.items():
        modules = dict(parts[comp].named_modules()) if comp != "vae_decoder" else {
            n: m for n, m in pipeline_model(pipe).vae_decoder.named_modules()}
        for name, spec in recipe.layers.items():
            w = modules[name].weight
            assert carries(modules[name]) == (spec is not None), name
            if spec is not None:
                assert torch.unique(w).numel() <= 2**spec.nbits


def test_applied_context_restores_the_pipeline(allocated) -> None:
    _, _, rec = allocated
    pipe = tiny_pipeline()
    before = state(pipe)
    model = pipeline_model(pipe, steps=2)
    inputs = model.inputs(["a red circle"], [3])
    with torch.no_grad():
        ref = model(**inputs)
        with rec.applied(pipe):
            changed = model(**inputs)
        again = model(**inputs)
    assert not torch.equal(ref, changed)
    assert torch.equal(ref, again)
    assert same_state(before, state(pipe))


def test_pipeline_recipe_file_round_trips_byte_identically(allocated, tmp_path) -> None:
    _, _, rec = allocated
    path = tmp_path / "pipeline_recipe.json"
    rec.save(path)
    loaded = PipelineRecipe.load(path)
    assert loaded.dumps() == path.read_text()
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    assert loaded.size_bytes == rec.size_bytes
    assert {n: r.layers for n, r in loaded.components.items()} == {n: r.layers for n, r in rec.components.items()}


def test_same_inputs_and_seed_give_the_same_bytes(allocated) -> None:
    _, _, rec = allocated
    again = allocate_bits(tiny_pipeline(), budget_bits=3.0, candidates=CANDS, n_probes=2, seed=0, progress=False,
                          n_samples=8, inputs=["a red circle", "a blue square"])
    assert again.dumps() == rec.dumps()


def test_the_measured_correction_keeps_the_recipe_that_measures_best_on_the_probe_runs(allocated) -> None:
    from palette.probe.measure import measure

    pipe, _, rec = allocated
    info = rec.info["refine"]
    assert info["rounds"] and set(info["rounds"][0]["ratios"]) <= set(rec.components)
    assert all(r > 0 for step in info["rounds"] for r in step["ratios"].values())
    assert rec.predicted_psnr == max(info["first_measured_psnr"],
                                     *(step.get("measured_psnr", -math.inf) for step in info["rounds"]))
    # the kept recipe's prediction is its measured PSNR on the probe runs, the same as measure() gives
    model = pipeline_model(pipe)
    probe = model.probe_set(["a red circle", "a blue square"], seed=0, n_samples=8)
    joint = {f"{c}.{n}": s for c, r in rec.components.items() for n, s in r.palettized.items()}
    assert rec.predicted_psnr == significant(measure(model, joint, probe).psnr, PSNR_DIGITS)
    plain = allocate_bits(tiny_pipeline(), budget_bits=3.0, candidates=CANDS, n_probes=2, seed=0, progress=False,
                          n_samples=8, inputs=["a red circle", "a blue square"], refine=0)
    assert "refine" not in plain.info and plain.predicted_psnr == info["first_measured_psnr"]
    assert rec.size_bytes <= plain.info["budget"]["bytes"] and plain.size_bytes <= plain.info["budget"]["bytes"]


def test_bad_pipelines_and_files_give_clear_errors(allocated, tmp_path) -> None:
    pipe, _, rec = allocated
    with pytest.raises(ValueError, match="unknown pipeline component.*'refiner'"):
        pipeline_model({**pipe, "refiner": pipe["unet"]})
    with pytest.raises(ValueError, match="has no 'unet'"):
        pipeline_model({k: v for k, v in pipe.items() if k != "unet"})
    with pytest.raises(ValueError, match="no tokenizer"):
        pipeline_model({k: v for k, v in pipe.items() if k != "tokenizer"})
    with pytest.raises(ValueError, match="one model, not a pipeline"):
        pipeline_model(pipe["unet"])
    with pytest.raises(ValueError, match="prompts"):
        allocate_bits(pipe, budget_bits=3.0, inputs=[(torch.zeros(1),)])
    d = json.loads(rec.dumps())
    d["components"]["transformer"] = d["components"].pop("unet")
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="bad.json.*unknown component"):
        PipelineRecipe.load(tmp_path / "bad.json")
    d = json.loads(rec.dumps())
    d["size_bytes"] += 1
    with pytest.raises(ValueError, match="not the sum of its components"):
        PipelineRecipe.from_dict(d)
    no_vae = {k: v for k, v in tiny_pipeline().items() if k != "vae"}
    with pytest.raises(ValueError, match="no component.*vae_decoder"):
        rec.apply(no_vae)


class CalledTwice(nn.Module):
    """y = L(x1) + L(x2): one layer, two calls."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.layer(x1) + self.layer(x2)


class CalledOnce(CalledTwice):
    """The same function (L is linear): y = L(x1 + x2)."""

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.layer(x1 + x2)


def test_a_layer_called_several_times_gets_the_sum_of_its_gradients() -> None:
    """The denoiser runs at every sampler step: its weight's per-sample gradient must be the sum
    over the calls, so the probe of y = L(x1) + L(x2) equals that of y = L(x1 + x2)."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, bias=False)
    x1, x2 = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    cands = Candidates(nbits=(1, 2, 4), granularities=("per_tensor",), min_numel=1)
    twice = probe_sensitivity(CalledTwice(layer), [(x1, x2)], cands, n_probes=4, progress=False)
    once = probe_sensitivity(CalledOnce(layer), [(x1, x2)], cands, n_probes=4, progress=False)
    last_only = probe_sensitivity(CalledOnce(layer), [(x2, torch.zeros_like(x2))], cands, n_probes=4, progress=False)
    assert np.allclose(twice.errors["layer"], once.errors["layer"], rtol=1e-4, atol=0)
    assert not np.allclose(twice.errors["layer"], last_only.errors["layer"], rtol=1e-2)


def test_the_pipeline_module_is_the_default_pipelines_sampler() -> None:
    """PipelineOutput runs the pipeline's own scheduler, steps and guidance: one prompt, one seed,
    the same image as DefaultPipeline.sample (guidance as two calls instead of a doubled batch)."""
    from palette.models.default import load_default

    pipe = load_default()
    model = pipeline_model(pipe, steps=3)
    assert isinstance(model, PipelineOutput) and model.guidance_scale == pipe.guidance_scale
    with torch.no_grad():
        got = model(**model.inputs(["a small red circle in the top left on a white background"], [5]))
    want = pipe.sample(["a small red circle in the top left on a white background"], steps=3, seed=5)
    assert torch.allclose(got, want, atol=1e-4)
    assert len(target_layers(model)) == len(target_layers(pipe.text_encoder)) + len(target_layers(pipe.unet))


def test_cli_refuses_a_missing_or_single_model_recipe_for_a_pipeline(allocated, tmp_path, capsys) -> None:
    from palette.cli import main

    _, _, rec = allocated
    single = tmp_path / "unet_recipe.json"
    rec.components["unet"].save(single)
    for recipe, says in ((tmp_path / "none.json", "no such file"), (single, "invalid pipeline recipe")):
        code = main(["apply", "--model", "default-pipeline", "--recipe", str(recipe), "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("palette: ") and says in err[0]


def cli_loads(monkeypatch, pipe: dict):
    """`--model default-pipeline` loads `pipe` (as an object with attributes, as the loaders give)."""
    import types

    import palette.pipeline_cli

    obj = types.SimpleNamespace(**pipe)
    monkeypatch.setattr(palette.pipeline_cli, "load_pipeline", lambda spec: (obj, "tiny pipeline", []))
    return obj


def test_a_pipeline_probe_set_defaults_to_the_pipeline_prompt_count() -> None:
    from palette import make_probe_set
    from palette.probe.inputs import DEFAULT_SAMPLES
    from palette.probe.pipeline_inputs import PIPELINE_SAMPLES

    model = pipeline_model(tiny_pipeline())
    assert make_probe_set(model).samples == model.probe_set().samples == PIPELINE_SAMPLES != DEFAULT_SAMPLES
    assert make_probe_set(model, n_samples=3).samples == 3


def test_cli_allocate_probes_a_pipeline_on_its_default_prompt_count(allocated, tmp_path, monkeypatch) -> None:
    import palette.pipeline_cli
    from palette.cli import main
    from palette.probe.inputs import DEFAULT_SAMPLES
    from palette.probe.pipeline_inputs import PIPELINE_SAMPLES

    _, _, rec = allocated
    cli_loads(monkeypatch, tiny_pipeline())
    asked = []
    monkeypatch.setattr(palette.pipeline_cli, "allocate_pipeline", lambda *a, **kw: asked.append(kw["n_samples"]) or rec)
    for extra in ([], ["--samples", "5"]):
        out = tmp_path / f"r{len(asked)}.json"
        assert main(["allocate", "--model", "default-pipeline", "--budget-bits", "3", "-o", str(out), "-q", *extra]) == 0
    assert asked == [PIPELINE_SAMPLES, 5] and PIPELINE_SAMPLES != DEFAULT_SAMPLES


def test_cli_apply_writes_every_component_and_replaces_no_foreign_folder(allocated, tmp_path, monkeypatch,
                                                                          capsys) -> None:
    from diffusers import UNet2DConditionModel

    from palette.cli import main
    from palette.export import load_palettes
    from palette.models.load import PALETTES_FILE

    _, _, rec = allocated
    path = tmp_path / "pipeline_recipe.json"
    rec.save(path)
    pipe = cli_loads(monkeypatch, tiny_pipeline())
    foreign = tmp_path / "out" / "unet"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep")
    code = main(["apply", "--model", "default-pipeline", "--recipe", str(path), "-o", str(tmp_path / "out"), "-q"])
    assert code == 2 and "did not write" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["unet"]  # checked before anything is written
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]
    out = tmp_path / "applied"
    for _ in range(2):  # a folder `apply` wrote is replaced
        assert main(["apply", "--model", "default-pipeline", "--recipe", str(path), "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(rec.components)
    for comp, recipe in rec.components.items():
        assert set(load_palettes(out / comp / PALETTES_FILE)) == set(recipe.palettized), comp
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    layer = next(iter(rec.components["unet"].palettized))
    assert torch.equal(dict(unet.named_modules())[layer].weight, dict(pipe.unet.named_modules())[layer].weight)


def test_cli_export_converts_the_text_encoder_with_its_mask_and_chunks_it(allocated, tmp_path, monkeypatch,
                                                                          capsys) -> None:
    """The text encoder is traced with the prepared additive mask (transformers' builder of it
    does not convert), which gives the pipeline's own embeddings; the chunks are verified, under
    the limit, and no more than predicted (for this text encoder the converter folds constants:
    the package stores less than the recipe counts)."""
    from palette.cli import main

    _, _, rec = allocated
    pipe = cli_loads(monkeypatch, tiny_pipeline())
    model = pipeline_model(pipe)
    ids, mask4 = model.example_inputs()["text_encoder"]
    assert mask4.shape == (1, 1, 1, ids.shape[1])
    ids2, mask = model.tokens(["a red circle"])
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids, mask4)[0], model.encode(ids2, mask))
    path = tmp_path / "te_recipe.json"
    PipelineRecipe({"text_encoder": rec.components["text_encoder"]}).save(path)
    limit = 2 * pipe.text_encoder.embeddings.word_embeddings.weight.numel() + 64  # the rest needs a second chunk
    code = main(["export", "--model", "default-pipeline", "--recipe", str(path), "-o", str(tmp_path / "out"),
                 "--max-chunk-bytes", str(limit), "--json", "-q"])
    assert code == 0
    te = json.loads(capsys.readouterr().out)["exports"]["text_encoder"]
    assert te["verified"] and te["palettized"] == len(rec.components["text_encoder"].palettized) > 0
    assert te["stored_palettized_bytes"] == te["predicted_palettized_bytes"]
    chunks = te["chunks"]
    assert 2 <= len(chunks["paths"]) <= chunks["predicted_count"]
    assert max(chunks["weight_bytes"]) <= limit and sum(chunks["weight_bytes"]) >= chunks["total_weight_bytes"]
    code = main(["export", "--model", "default-pipeline", "--recipe", str(path), "-o", str(tmp_path / "small"),
                 "--max-chunk-bytes", str(limit - 128)])
    assert code == 2 and "text_encoder: the weight embeddings.word_embeddings.weight alone" in capsys.readouterr().err
    assert not (tmp_path / "small").exists()  # refused before converting


def test_a_transformer_pipeline_with_its_own_denoiser_call_is_allocated_jointly() -> None:
    """A flow-matching pipeline whose denoiser is an SD3 transformer, called the pipeline's way
    (`denoise`: its pooled text embedding, here the mean text state), with SD3's Euler scheduler:
    one knapsack over text encoder, transformer and VAE decoder fits the budget and leaves the
    pipeline as it was; exporting it whole says to export the transformer on its own."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import BertConfig, BertModel

    from palette.models.zoo import build

    pipe = tiny_pipeline()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        pipe["text_encoder"] = BertModel(BertConfig(vocab_size=pipe["tokenizer"].vocab_size, hidden_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32)).eval()
    sd3 = build("sd3", tiny=True, overrides={"pooled_projection_dim": 64, "sample_size": 8})
    pipe.update(unet=sd3, scheduler=FlowMatchEulerDiscreteScheduler(),
                denoise=lambda x, t, cond: sd3(x, encoder_hidden_states=cond, pooled_projections=cond.mean(1),
                                               timestep=t.reshape(-1).expand(len(x))))
    before = state(pipe)
    rec = allocate_bits(pipe, budget_bits=3.0, candidates=CANDS, n_probes=2, seed=0, progress=False,
                        n_samples=8, inputs=["a red circle", "a blue square"])
    assert isinstance(rec, PipelineRecipe) and set(rec.components) == {"text_encoder", "unet", "vae_decoder"}
    assert rec.bits_per_weight <= 3.0 and rec.components["unet"].palettized
    assert same_state(before, state(pipe))
    with pytest.raises(ValueError, match="export the denoiser on its own"):
        pipeline_model(pipe).example_inputs()
