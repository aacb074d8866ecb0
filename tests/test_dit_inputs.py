"""Data-free probe inputs for diffusion transformers (palette.probe.dit_inputs), their full-size configs
(palette.models.zoo) and the hub size figures (recipes/hub_specs.py)."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from palette.probe.dit_inputs import FLUX_GUIDANCE, dit_probe_set, example_input, is_dit
from palette.models import zoo
from palette.probe import PROMPTS, make_probe_set

from dits import LATENT, shared_tiny as tiny

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("sd3", "sd35-large", "flux-dev", "flux-schnell", "pixart-sigma", "sana")


def probe(name: str, model: nn.Module | None = None, **kw):
    return dit_probe_set(model if model is not None else tiny(name), latent_size=LATENT.get(name), **kw)


def seen_inputs(model: nn.Module, unit) -> dict:
    """The keyword inputs `unit` calls `model` with."""
    seen: dict = {}

    def hook(_module, _args, kwargs):
        seen.update(kwargs)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            unit(model)
    finally:
        handle.remove()
    return seen


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


U8 = (torch.arange(8, dtype=torch.float64) + 0.5) / 8


@pytest.mark.parametrize("name", FAMILIES)
def test_probe_set_runs_batched_with_a_sample_axis(name: str) -> None:
    model = tiny(name)
    ps = probe(name, n_samples=5, batch_size=2)
    with torch.no_grad():
        outs = [u(model) for u in ps.units]
    assert [o.shape[0] for o in outs] == [2, 2, 1]
    cfg = model.config
    if name.startswith("flux"):
        per_sample = ((LATENT[name] // 2) ** 2, cfg.in_channels)
    else:
        side = cfg.sample_size
        per_sample = (cfg.in_channels, side, side)  # PixArt: the noise half of its 8 channels
    assert all(tuple(o.shape[1:]) == per_sample and torch.isfinite(o).all() for o in outs)
    assert ps.description.startswith(f"synthesised for {type(model).__name__}: 5 noisy latent-like samples")


@pytest.mark.parametrize("name", FAMILIES)
def test_same_seed_same_outputs_other_seed_other_outputs(name: str) -> None:
    model = tiny(name)
    with torch.no_grad():
        a = [u(model) for u in probe(name, n_samples=2, seed=3).units]
        b = [u(model) for u in probe(name, n_samples=2, seed=3).units]
        c = [u(model) for u in probe(name, n_samples=2, seed=4).units]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.allclose(x, y) for x, y in zip(a, c, strict=True))


def test_noise_levels_span_each_family_schedule() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    def inputs(name: str) -> dict:
        ps = probe(name, n_samples=8, batch_size=8)
        return seen_inputs(tiny(name), ps.units[0])

    sd3 = inputs("sd3")  # 1000 sigma, sigma = shift-3 levels: diffusers' own shift of the same levels
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(sigmas=U8.float().numpy())
    assert sd3["timestep"].dtype == torch.float32
    assert torch.allclose(sd3["timestep"], 1000 * reference.sigmas[:-1], atol=1e-3)
    assert sd3["timestep"].min() < 200 and sd3["timestep"].max() > 970

    dev = inputs("flux-dev")  # sigma itself, exponential shift mu of 16 image tokens, guidance
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    reference.set_timesteps(sigmas=U8.float().numpy(), mu=mu)
    assert torch.allclose(dev["timestep"], reference.sigmas[:-1], atol=1e-6)
    assert torch.equal(dev["guidance"], torch.full((8,), FLUX_GUIDANCE))
    assert dev["img_ids"].shape == (16, 3) and dev["img_ids"][:, 1:].max() == 3 and not dev["txt_ids"].any()
    assert dev["encoder_hidden_states"].shape[1] == 512

    schnell = inputs("flux-schnell")  # shift 1: the levels themselves, no guidance, 256 T5 tokens
    assert torch.allclose(schnell["timestep"], U8.float()) and "guidance" not in schnell
    assert schnell["encoder_hidden_states"].shape[1] == 256

    pixart = inputs("pixart-sigma")  # DDPM integer timesteps over 1000 steps
    assert pixart["timestep"].tolist() == [62, 187, 312, 437, 562, 687, 812, 937]

    sana = inputs("sana")  # DPM-Solver flow sigmas, shift 3, integer timesteps
    assert torch.equal(sana["timestep"], torch.floor(1000 * shifted(U8, 3.0)).float())
    assert sana["encoder_attention_mask"].shape == (8, 300)


def test_a_given_scheduler_is_followed() -> None:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    ps = probe("sd3", n_samples=8, batch_size=8, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
    assert torch.allclose(seen_inputs(tiny("sd3"), ps.units[0])["timestep"], 1000 * U8.float())
    assert "FlowMatchEulerDiscreteScheduler: shift 1" in ps.description
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert "DDPMScheduler (scaled_linear)" in probe("pixart-sigma", scheduler=ddpm).description
    with pytest.raises(ValueError, match="not a flow-matching"):
        probe("sana", scheduler=ddpm)


@pytest.mark.parametrize("name", FAMILIES)
def test_inputs_follow_the_model_dtype_and_device(name: str) -> None:
    model = tiny(name)
    ps = probe(name, n_samples=2)
    double = copy.deepcopy(model).double()
    seen = seen_inputs(double, ps.units[0])
    assert seen["hidden_states"].dtype == seen["encoder_hidden_states"].dtype == torch.float64
    assert seen["timestep"].dtype in (torch.float32, torch.int64)  # as the pipelines pass it
    with torch.no_grad():
        assert torch.allclose(ps.units[0](double), ps.units[0](model), atol=1e-4)
    made = probe(name, double, n_samples=2).units[0].kwargs  # made for a float64 model: float64
    assert made["hidden_states"].dtype == torch.float64 and made["hidden_states"].device == torch.device("cpu")


def test_pixart_micro_conditions() -> None:
    _, cfg = zoo.config("pixart-sigma", tiny=True)  # the size embedders split the width in 3: 48 wide
    cfg.update(attention_head_dim=24, cross_attention_dim=48, use_additional_conditions=True)
    model = type(tiny("pixart-sigma"))(**cfg).eval()
    ps = dit_probe_set(model, n_samples=2)
    seen = seen_inputs(model, ps.units[0])
    assert seen["added_cond_kwargs"]["resolution"].tolist() == [[64.0, 64.0]] * 2
    assert seen["encoder_hidden_states"].shape[1] == 120  # PixArt-alpha's prompt length
    assert "micro-conditions 64x64 px" in ps.description


def test_unknown_models_are_a_clear_error() -> None:
    assert not is_dit(zoo.build("sd15-unet", tiny=True)) and is_dit(tiny("sana"))
    with pytest.raises(ValueError, match="cannot synthesise diffusion-transformer inputs for a Linear"):
        dit_probe_set(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="cannot synthesise probe inputs for a Linear"):
        make_probe_set(nn.Linear(4, 4))
    _, cfg = zoo.config("sana", tiny=True)
    sprint = type(tiny("sana"))(**{**cfg, "guidance_embeds": True})
    with pytest.raises(ValueError, match="SANA-Sprint"):
        dit_probe_set(sprint)


def test_make_probe_set_dispatches_to_the_transformers() -> None:
    ps = make_probe_set(tiny("sana"), n_samples=3, seed=1)
    assert ps.description == probe("sana", n_samples=3, seed=1).description
    assert "seed 1" in ps.description


EXAMPLE_ARGS = {
    "sd3": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"],
    "flux-dev": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                 "guidance"],
    "flux-schnell": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                     "txt_ids"],
    "pixart-sigma": ["hidden_states", "encoder_hidden_states", "timestep"],
    "sana": ["hidden_states", "encoder_hidden_states", "timestep"],
}


@pytest.mark.parametrize("name", list(EXAMPLE_ARGS))
def test_example_input_is_one_positional_sample(name: str) -> None:
    model = tiny(name)
    ex = example_input(model, latent_size=LATENT.get(name))
    assert list(inspect.signature(model.forward).parameters)[: len(ex.args)] == EXAMPLE_ARGS[name]
    assert ex.args[0].shape[0] == 1 and all(isinstance(a, torch.Tensor) for a in ex.args)
    with torch.no_grad():
        full = model(*ex.args, **ex.kwargs).sample
        assert full.shape[0] == 1 and torch.isfinite(full).all()
        assert model(*ex.args).sample.shape == full.shape  # args alone trace (text padding unmasked)


def _tokenizer():
    from palette.models.minilm import load_minilm

    return load_minilm()[1]


def _t5(width: int) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=30522, d_model=width, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2)).eval()


def _clip(width: int, projection: bool) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=30522, hidden_size=width, projection_dim=width, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, eos_token_id=102)  # BERT's [SEP]
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def test_real_embeddings_from_the_pipeline_encoders() -> None:
    tok = _tokenizer()
    clip_l, clip_g, t5 = _clip(16, True), _clip(16, True), _t5(64)  # SD3 tiny: pooled 32, joint 64
    ps = probe("sd3", n_samples=2, text_encoders=[clip_l, clip_g, t5], tokenizers=[tok, tok, tok])
    seen = seen_inputs(tiny("sd3"), ps.units[0])
    ids = tok(list(PROMPTS[:2]), padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pooled = torch.cat([clip_l(ids).text_embeds, clip_g(ids).text_embeds], dim=-1)
    assert torch.allclose(seen["pooled_projections"], pooled)
    hidden = seen["encoder_hidden_states"]
    assert hidden.shape == (2, 77 + 256, 64) and not hidden[:, :77, 32:].any()  # CLIP zero-padded to T5's width
    assert "real embeddings of the built-in prompts (CLIPTextModelWithProjection" in ps.description

    flux = probe("flux-dev", n_samples=2, text_encoders=(_clip(32, False), t5), tokenizers=(tok, tok))
    assert seen_inputs(tiny("flux-dev"), flux.units[0])["encoder_hidden_states"].shape == (2, 512, 64)

    pixart = probe("pixart-sigma", n_samples=2, text_encoders=_t5(48), tokenizers=tok)
    mask = seen_inputs(tiny("pixart-sigma"), pixart.units[0])["encoder_attention_mask"]
    assert mask.sum(1).tolist() == [len(tok(p)["input_ids"]) for p in PROMPTS[:2]]  # the prompts' own tokens
    with pytest.raises(ValueError, match="gives 64-d embeddings, the SanaTransformer2DModel expects 48"):
        probe("sana", text_encoders=t5, tokenizers=tok)
    with pytest.raises(ValueError, match="takes 2 or 3 text encoders"):
        probe("sd3", text_encoders=t5, tokenizers=tok)


def test_full_configs_and_hub_figures_are_the_published_ones() -> None:
    spec = importlib.util.spec_from_file_location("hub_specs", ROOT / "recipes" / "hub_specs.py")
    hub_specs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub_specs)
    stored = {m["name"]: m for m in json.loads((ROOT / "recipes" / "hub_specs.json").read_text())["models"]}
    for name, arch, _ in hub_specs.TRANSFORMERS:
        source = zoo.FULL_CONFIG_SOURCES[arch]
        figures = hub_specs.figures(arch)
        component = stored[name]["components"][0]
        assert stored[name]["model_id"] == source.model_id and component["budgets_gb"] == figures.pop("_commands")
        assert {k: component[k] for k in figures} == figures, name
        assert math.isclose(figures["parameters"], source.published_params, rel_tol=0.02), name
