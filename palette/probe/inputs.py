"""Probe inputs: normalise user inputs, or synthesise them data-free for diffusion UNets and text
encoders, into a `ProbeSet` of units (callables `model -> output tensor`), each a batch of samples.

Data-free synthesis for a diffusers `UNet2DConditionModel`:
- timesteps spread evenly over the training schedule (`(i + 0.5) * T / n`, one per sample);
- x0 with latent-like statistics: a smooth random field (bilinear upsampling of 1/8-resolution
  Gaussian noise plus half-amplitude white noise), normalised to zero mean and unit std per sample
  and channel (SD latents times the VAE scale factor have about unit std);
- noisy = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with abar from the given scheduler's
  `alphas_cumprod` or else SD's scaled_linear schedule (0.00085..0.012, 1000 steps). DDPM, DDIM,
  PNDM and DPM-Solver's `scale_model_input` is the identity, so no further scaling is applied;
- conditioning: real `last_hidden_state` embeddings of `PROMPTS` when a text encoder and tokenizer
  are given; otherwise text-embedding-like statistics: per-dimension offsets N(0, 0.5^2) and
  log-normal scales, a per-prompt component shared by all tokens, 77 tokens.
For a transformers text encoder: the tokenized `PROMPTS` (or random ids within the vocabulary, with
a full attention mask, when no tokenizer is given); output `last_hidden_state`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import integer

Unit = Callable[[nn.Module], torch.Tensor]

PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse",
    "a red circle on a white background",
    "a watercolor painting of a lighthouse at dusk",
    "a close-up portrait of an old man with a beard",
    "a bowl of fruit on a wooden table",
    "a futuristic city skyline at night, neon lights",
    "a small blue house in a snowy forest",
    "an oil painting of a stormy sea",
    "a cat sleeping on a windowsill in the sun",
    "a green triangle above a yellow square",
    "a mountain lake reflecting pine trees",
    "a plate of pasta with basil and tomatoes",
    "a vintage car parked on a cobblestone street",
    "a pencil sketch of a hummingbird",
    "a field of sunflowers under a cloudy sky",
    "a robot reading a book in a library",
)
DEFAULT_SAMPLES = 16  # synthesised probe samples (with K = 2 passes each: RESULTS, accuracy against cost)
SD_BETAS = (0.00085, 0.012, 1000)  # scaled_linear: beta_start, beta_end, num_train_timesteps
TEXT_SEQ_LEN = 77


@dataclass(frozen=True)
class ProbeSet:
    """Units of probe samples (sample = first dim of a unit's output) and what they are."""

    units: tuple[Unit, ...]
    description: str
    batch_size: int = 1  # the most samples one unit holds (1 where it cannot be told)
    n_samples: int | None = None  # samples in all units (None where it cannot be told: a callable)

    @property
    def samples(self) -> int:
        """Samples in all units; one per unit where that cannot be told."""
        return self.n_samples if self.n_samples is not None else len(self.units)


def main_output(out: Any) -> torch.Tensor:
    """The model's main output tensor in fp32: `.sample`, `last_hidden_state`, or the first one."""
    if isinstance(out, torch.Tensor):
        t = out
    elif isinstance(out, Mapping):
        key = next((k for k in ("sample", "last_hidden_state") if k in out), None)
        t = out[key] if key is not None else next(iter(out.values()))
    elif hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        t = out.sample
    elif hasattr(out, "last_hidden_state") and isinstance(out.last_hidden_state, torch.Tensor):
        t = out.last_hidden_state
    elif isinstance(out, (tuple, list)) and out:
        return main_output(out[0])
    else:
        raise ValueError(f"cannot find the main output tensor in a {type(out).__name__}")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"the model's main output is a {type(t).__name__}, not a tensor")
    return t.float()


def _detached(x: Any, device: torch.device | None = None) -> Any:
    """Tensors of `x` (nested in dicts) detached, and moved to `device` if given."""
    if isinstance(x, torch.Tensor):
        return x.detach() if device is None else x.detach().to(device)
    if isinstance(x, Mapping):
        return {k: _detached(v, device) for k, v in x.items()}
    return x


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _call_unit(args: tuple, kwargs: dict) -> Unit:
    """A unit calling the model on these inputs (detached: probing owns the autograd graph), moved
    to the model's device when it runs: the model's device decides."""
    args, kwargs = tuple(_detached(a) for a in args), _detached(kwargs)

    def unit(m: nn.Module) -> torch.Tensor:
        device = model_device(m)
        return main_output(m(*(_detached(a, device) for a in args), **_detached(kwargs, device)))

    return unit


def _as_unit(item: Any, i: int) -> Unit:
    if isinstance(item, torch.Tensor):
        return _call_unit((item,), {})
    if isinstance(item, Mapping):
        return _call_unit((), dict(item))
    if isinstance(item, tuple):
        return _call_unit(item, {})
    raise ValueError(
        f"inputs[{i}]: expected a tuple of tensors (or a dict of keyword tensors), "
        f"got {type(item).__name__}"
    )


def make_probe_set(
    model: nn.Module,
    inputs: Any = None,
    *,
    seed: int = 0,
    n_samples: int | None = None,
    batch_size: int | None = None,
    text_encoder: nn.Module | None = None,
    tokenizer: Any = None,
    scheduler: Any = None,
    sample_size: int | tuple[int, int] | None = None,
) -> ProbeSet:
    """Normalise `inputs` (tuple, list of tuples, dict, callable) or synthesise them (inputs=None):
    `n_samples` samples (default `DEFAULT_SAMPLES`; a whole pipeline's, `PIPELINE_SAMPLES` prompts)
    in units of `batch_size`, latents of `sample_size` (default: the model's config) for a
    denoiser. Tensors go to the model's device when a unit runs."""
    if inputs is not None:
        if callable(inputs) and not isinstance(inputs, (nn.Module, torch.Tensor)):
            return ProbeSet((inputs,), "user callable")
        items = list(inputs) if isinstance(inputs, list) else [inputs]
        if not items:
            raise ValueError("inputs is an empty list")
        units = tuple(_as_unit(item, i) for i, item in enumerate(items))
        return ProbeSet(units, f"user inputs: {len(units)} batch(es)", max(_batch_of(item) for item in items),
                        sum(_batch_of(item) for item in items))
    from .dit_inputs import dit_probe_set, is_dit  # it builds on this module's pieces
    from .pipeline_inputs import PIPELINE_SAMPLES, PipelineOutput  # so does the whole pipeline as one module

    default = PIPELINE_SAMPLES if isinstance(model, PipelineOutput) else DEFAULT_SAMPLES
    n_samples = integer(default if n_samples is None else n_samples, "n_samples", minimum=1)
    if batch_size is not None:
        batch_size = integer(batch_size, "batch_size", minimum=1)
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:  # pragma: no cover
        UNet2DConditionModel = ()  # type: ignore[assignment]
    if isinstance(model, UNet2DConditionModel):
        return _unet_probe_set(model, seed, n_samples, batch_size, text_encoder, tokenizer, scheduler, sample_size)
    if isinstance(model, PipelineOutput):  # prompts and seeded noise -> the image
        return model.probe_set(seed=seed, n_samples=n_samples, batch_size=batch_size or 4)

    if is_dit(model):  # diffusion transformers: text_encoder and tokenizer may be the pipeline's, in order
        return dit_probe_set(model, seed=seed, n_samples=n_samples, batch_size=batch_size,
                             text_encoders=text_encoder, tokenizers=tokenizer, scheduler=scheduler,
                             latent_size=sample_size)
    if hasattr(model, "get_input_embeddings") and hasattr(getattr(model, "config", None), "vocab_size"):
        return _text_probe_set(model, seed, n_samples, batch_size, tokenizer)
    raise ValueError(
        f"cannot synthesise probe inputs for a {type(model).__name__}: pass inputs= "
        "(a tuple of tensors, a list of such tuples, or a callable model -> output)"
    )


def _batch_of(item: Any) -> int:
    """The first dimension of an input item's first tensor (1 if it has none)."""
    first = item if isinstance(item, torch.Tensor) else next(
        (t for t in (item.values() if isinstance(item, Mapping) else item) if isinstance(t, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _alphas_cumprod(scheduler: Any) -> tuple[torch.Tensor, str]:
    if scheduler is not None and getattr(scheduler, "alphas_cumprod", None) is not None:
        cfg = getattr(scheduler, "config", {})
        name = f"{type(scheduler).__name__} ({cfg.get('beta_schedule', '?')})"
        return torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64), name
    start, end, steps = SD_BETAS
    betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0), "scaled_linear 0.00085..0.012 (SD default)"


def _latent_like(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    b, c, h, w = shape
    low = torch.randn((b, c, max(1, h // 8), max(1, w // 8)), generator=gen)
    x = nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.5 * torch.randn(shape, generator=gen)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x / x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def _text_like(n: int, seq: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    offset = 0.5 * torch.randn(dim, generator=gen)
    scale = torch.exp(0.3 * torch.randn(dim, generator=gen))
    prompt = torch.randn((n, 1, dim), generator=gen)
    token = torch.randn((n, seq, dim), generator=gen)
    return offset + scale * (0.6 * prompt + 0.8 * token)


@torch.no_grad()
def _encode(text_encoder: nn.Module, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    max_len = getattr(tokenizer, "model_max_length", None)
    if max_len == TEXT_SEQ_LEN:  # CLIP: SD always pads to 77 tokens
        tok = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    else:
        tok = tokenizer(prompts, padding="longest", truncation=True, return_tensors="pt")
    device = model_device(text_encoder)
    kwargs = {"attention_mask": tok["attention_mask"].to(device)} if "attention_mask" in tok else {}
    return main_output(text_encoder(input_ids=tok["input_ids"].to(device), **kwargs)).cpu()


def _unet_probe_set(unet, seed, n, batch_size, text_encoder, tokenizer, scheduler, sample_size) -> ProbeSet:
    cfg = unet.config
    if cfg.class_embed_type is not None or cfg.addition_embed_type not in (None, "text_time"):
        raise ValueError(
            f"cannot synthesise class labels or '{cfg.addition_embed_type}' conditioning; pass inputs="
        )
    gen = torch.Generator().manual_seed(seed)
    size = sample_size if sample_size is not None else cfg.sample_size
    size = size if isinstance(size, (tuple, list)) else (size,) * 2
    size = tuple(int(s) for s in size)
    abar, sched_name = _alphas_cumprod(scheduler)
    t_max = len(abar)
    timesteps = torch.tensor([int((i + 0.5) * t_max / n) for i in range(n)], dtype=torch.long)
    x0 = _latent_like((n, cfg.in_channels, *size), gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = abar[timesteps].float().view(n, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    dim = cfg.encoder_hid_dim or cfg.cross_attention_dim
    dim = dim[0] if isinstance(dim, (tuple, list)) else dim
    if text_encoder is not None and tokenizer is not None:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        cond = _encode(text_encoder, tokenizer, prompts)
        if cond.shape[-1] != dim:
            raise ValueError(f"text encoder gives {cond.shape[-1]}-d embeddings, the UNet expects {dim}")
        cond_desc = f"real embeddings of {n} built-in prompts ({type(text_encoder).__name__}, {cond.shape[1]} tokens)"
    else:
        cond = _text_like(n, TEXT_SEQ_LEN, dim, gen)
        cond_desc = f"synthetic text-embedding-like conditioning ({TEXT_SEQ_LEN} tokens x {dim})"
    dtype = unet.dtype
    extra = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embeds + size/crop time ids
        n_time = 6 * cfg.addition_time_embed_dim
        pooled = torch.randn((n, cfg.projection_class_embeddings_input_dim - n_time), generator=gen)
        h, w = (8 * s for s in size)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(n, 1)
        extra = {"text_embeds": pooled, "time_ids": time_ids}
    if batch_size is None:
        batch_size = 4 if math.prod(size) <= 32 * 32 else 1
    units = []
    for sl in _batches(n, batch_size):
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond[sl].to(dtype)}
        if extra:
            kwargs["added_cond_kwargs"] = {k: v[sl].to(dtype) for k, v in extra.items()}
        units.append(_call_unit((noisy[sl].to(dtype), timesteps[sl]), kwargs))
    desc = (
        f"synthesised: {n} noisy latent-like samples {cfg.in_channels}x{size[0]}x{size[1]} at timesteps "
        f"{timesteps.tolist()} of {sched_name}; {cond_desc}; seed {seed}"
    )
    return ProbeSet(tuple(units), desc, batch_size, n)


def _text_probe_set(model, seed, n, batch_size, tokenizer) -> ProbeSet:
    gen = torch.Generator().manual_seed(seed)
    if tokenizer is not None:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        tok = tokenizer(prompts, padding="longest", truncation=True, return_tensors="pt")
        ids, mask = tok["input_ids"], tok["attention_mask"]
        desc = f"synthesised: {n} built-in prompts tokenized ({ids.shape[1]} tokens)"
    else:
        ids = torch.randint(0, model.config.vocab_size, (n, 16), generator=gen)
        mask = torch.ones_like(ids)
        desc = f"synthesised: {n} x 16 random token ids within the vocabulary, seed {seed}"
    units = [
        _call_unit((), {"input_ids": ids[sl], "attention_mask": mask[sl]})
        for sl in _batches(n, batch_size or n)
    ]
    return ProbeSet(tuple(units), desc + "; output last_hidden_state", batch_size or n, n)
