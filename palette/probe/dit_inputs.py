"""Data-free probe inputs for diffusion transformers: SD3 / SD3.5 (MMDiT), FLUX.1, PixArt, SANA.

What each family's diffusers pipeline feeds its transformer, synthesised from the transformer's
own config (diffusers 0.42 `StableDiffusion3Pipeline`, `FluxPipeline`, `PixArtSigmaPipeline`,
`SanaPipeline`), one sample per noise level:

- x0: latent-like (`inputs._latent_like`: a smooth random field with unit std per sample and
  channel, as VAE latents times their scale factor), `in_channels` x `sample_size`^2 (the
  pipelines' default 1024 px). FLUX: `in_channels / 4` = 16 channels at 128^2, packed in 2x2
  patches into a 4096 x 64 token sequence, with `img_ids` (0, row, col) and zero `txt_ids`.
- noise levels spread over the family's schedule, u_i = (i + 0.5) / n:
  flow matching (SD3, FLUX, SANA): sigma_i = u_i shifted as the scheduler does (SD3: shift 3;
  FLUX.1-schnell: 1; FLUX.1-dev: the exponential shift mu of its image-token count; SANA:
  flow_shift 3; or the given scheduler's settings), noisy = (1 - sigma) x0 + sigma eps, timestep
  SD3 1000 sigma, FLUX sigma (the model scales it by 1000) plus guidance 3.5 for -dev, SANA
  floor(1000 sigma) x timestep_scale (DPM-Solver's integer timesteps).
  DDPM (PixArt): timestep t_i = (i + 0.5) T / n, noisy = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
  abar from the given scheduler or PixArt's linear betas 1e-4..0.02 over 1000 steps.
- conditioning, the pipelines' widths and lengths, text-embedding-like (`inputs._text_like`):
  SD3 77 CLIP tokens (CLIP-L + CLIP-G, `pooled_projection_dim` wide, zero-padded to
  `joint_attention_dim`) then 256 T5 tokens, and pooled CLIP projections; FLUX 512 T5 tokens
  (256 for schnell, its model card's limit) and a pooled CLIP-L vector; PixArt-Sigma and SANA 300
  tokens of `caption_channels` (PixArt-alpha, with micro-conditions: 120) with an encoder
  attention mask over a prompt-like 6..32 valid tokens, and PixArt's resolution / aspect-ratio
  micro-conditions when the model uses them. Or real embeddings of `PROMPTS` from the pipeline's
  text encoders and tokenizers, in the pipeline's order: SD3 (CLIP-L, CLIP-G[, T5]), FLUX
  (CLIP-L, T5), PixArt (T5,), SANA (Gemma-2,) -- SANA's without its complex human instruction.

PixArt predicts a learned variance beside the noise; its units return the noise half (what the
pipeline keeps). Inputs are made on CPU from a seeded generator, then placed on the model's device
and, floating ones, in its dtype -- except `timestep` and `guidance`, kept in fp32 (or int64) as
the pipelines pass them -- and units place them again on whatever model they are called with.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .inputs import DEFAULT_SAMPLES, PROMPTS, ProbeSet, _alphas_cumprod, _latent_like, _text_like, main_output

CLIP_TOKENS = 77
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length
FLUX_T5_TOKENS = {True: 512, False: 256}  # by guidance_embeds: FLUX.1-dev, FLUX.1-schnell
PIXART_TOKENS = {False: 300, True: 120}  # by use_additional_conditions: PixArt-Sigma, PixArt-alpha
SANA_TOKENS = 300
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
FLUX_SAMPLE_SIZE = 128  # FluxPipeline's default_sample_size (latent side before packing)
PROMPT_TOKENS = (6, 32)  # valid tokens of a synthetic masked prompt, inclusive range
PIXART_BETAS = (1e-4, 0.02, 1000)  # linear: DPMSolverMultistepScheduler's defaults, PixArt's schedule
VAE_SCALE = 8  # pixels per latent for PixArt's resolution micro-condition (SD / SDXL VAE)
SHARED_KEYS = frozenset({"img_ids", "txt_ids"})  # no sample axis: one copy for the whole batch
FP32_KEYS = frozenset({"timestep", "guidance"})  # passed in fp32 (or int64) whatever the model's dtype

# The scheduler settings each family's pipeline ships with (scheduler/scheduler_config.json).
SD3_SCHEDULER = {"shift": 3.0}
FLUX_DEV_SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULER = {"shift": 1.0}
SANA_SCHEDULER = {"use_flow_sigmas": True, "flow_shift": 3.0}


@dataclass(frozen=True)
class ExampleInput:
    """One sample (batch 1) of a transformer's inputs for tracing and Core ML export.

    `args`: the leading positional tensors of `forward` (what `export_coreml` traces; alone they
    attend to every text token); `kwargs`: the other inputs the pipeline passes (encoder attention
    mask, PixArt's `added_cond_kwargs`). `model(*args, **kwargs)` runs the sample as the pipeline would.
    """

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class _Synth:
    """Forward keyword inputs for all samples, with what the probe set needs to know about them."""

    kwargs: dict[str, Any]
    tokens: int  # image tokens a sample (picks the default batch size)
    keep_channels: int | None  # output channels kept (PixArt's learned sigma: the noise half)
    description: str


@dataclass(frozen=True)
class _Unit:
    """Calls a model on keyword inputs placed for it; returns its main output (fp32, sample axis first)."""

    kwargs: Mapping[str, Any]
    keep_channels: int | None = None

    def __call__(self, model: nn.Module) -> torch.Tensor:
        p = next(model.parameters())
        out = main_output(model(**_placed(self.kwargs, p.device, p.dtype)))
        return out if self.keep_channels is None else out[:, : self.keep_channels]


def _placed(x: Any, device: torch.device, dtype: torch.dtype, key: str = "") -> Any:
    """Tensors on `device`; floating ones in `dtype` except FP32_KEYS; nested dicts likewise."""
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype) if x.is_floating_point() and key not in FP32_KEYS else x.to(device)
    if isinstance(x, Mapping):
        return {k: _placed(v, device, dtype, k) for k, v in x.items()}
    return x


def _sliced(x: Any, sl: slice, key: str = "") -> Any:
    if isinstance(x, torch.Tensor) and key not in SHARED_KEYS:
        return x[sl]
    if isinstance(x, Mapping):
        return {k: _sliced(v, sl, k) for k, v in x.items()}
    return x


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _family(model: nn.Module) -> Callable[..., _Synth] | None:
    import diffusers

    for name, build in _BUILDERS.items():
        if isinstance(model, getattr(diffusers, name)):
            return build
    return None


def is_dit(model: nn.Module) -> bool:
    """Whether `model` is one of the diffusion transformers this module synthesises inputs for."""
    return _family(model) is not None


def _synthesise(model, n, seed, latent_size, text_encoders, tokenizers, scheduler) -> _Synth:
    build = _family(model)
    if build is None:
        raise ValueError(
            f"cannot synthesise diffusion-transformer inputs for a {type(model).__name__} "
            f"(known: {', '.join(DIT_CLASSES)}); pass inputs="
        )
    if n < 1:
        raise ValueError(f"n_samples must be >= 1, got {n}")
    encoders, toks = _as_tuple(text_encoders), _as_tuple(tokenizers)
    if len(encoders) != len(toks):
        raise ValueError(f"{len(encoders)} text encoder(s) but {len(toks)} tokenizer(s): give one tokenizer each")
    gen = torch.Generator().manual_seed(seed)
    synth = build(model, n, gen, latent_size, encoders, toks, scheduler)
    p = next(model.parameters())
    return _Synth(_placed(synth.kwargs, p.device, p.dtype), synth.tokens, synth.keep_channels,
                  f"synthesised for {type(model).__name__}: {synth.description}; seed {seed}")


def dit_probe_set(
    model: nn.Module,
    *,
    seed: int = 0,
    n_samples: int = DEFAULT_SAMPLES,
    batch_size: int | None = None,
    text_encoders: nn.Module | Sequence[nn.Module] | None = None,
    tokenizers: Any = None,
    scheduler: Any = None,
    latent_size: int | None = None,
) -> ProbeSet:
    """`n_samples` data-free probe samples for an SD3 / FLUX / PixArt / SANA transformer, as units.

    `text_encoders` / `tokenizers`: the pipeline's, in its order (see the module docstring), for
    real prompt embeddings; `scheduler`: its scheduler, for its shift or noise schedule;
    `latent_size`: the latent side (default the pipeline's 1024 px). Batches of 4 samples up to
    1024 image tokens, else 1, unless `batch_size` is given.
    """
    s = _synthesise(model, n_samples, seed, latent_size, text_encoders, tokenizers, scheduler)
    if batch_size is None:
        batch_size = 4 if s.tokens <= 1024 else 1
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    units = tuple(
        _Unit(_sliced(s.kwargs, slice(i, i + batch_size)), s.keep_channels)
        for i in range(0, n_samples, batch_size)
    )
    return ProbeSet(units, s.description, batch_size, n_samples)


def example_input(
    model: nn.Module,
    *,
    seed: int = 0,
    latent_size: int | None = None,
    text_encoders: nn.Module | Sequence[nn.Module] | None = None,
    tokenizers: Any = None,
    scheduler: Any = None,
) -> ExampleInput:
    """One sample (mid-schedule) of the model's inputs, split into positional `args` and `kwargs`."""
    kwargs = dict(_synthesise(model, 1, seed, latent_size, text_encoders, tokenizers, scheduler).kwargs)
    args = []
    for name, param in inspect.signature(model.forward).parameters.items():
        if param.kind is not param.POSITIONAL_OR_KEYWORD or not isinstance(kwargs.get(name), torch.Tensor):
            break
        args.append(kwargs.pop(name))
    return ExampleInput(tuple(args), kwargs)


# -- shared pieces ---------------------------------------------------------------------------------


def _latent_side(model: nn.Module, latent_size: int | None, default: int, multiple: int) -> int:
    size = int(latent_size if latent_size is not None else default)
    if size < multiple or size % multiple:
        raise ValueError(f"{type(model).__name__}: latent size {size} must be a positive multiple of {multiple}")
    return size


def _levels(n: int) -> torch.Tensor:
    """u_i = (i + 0.5) / n: n points spread evenly over (0, 1)."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def _scheduler_settings(scheduler: Any, default: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if scheduler is None:
        return default, "the pipeline's scheduler settings"
    return dict(scheduler.config), type(scheduler).__name__


def _flow_sigmas(n: int, settings: Mapping[str, Any], image_tokens: int) -> tuple[torch.Tensor, str]:
    """Flow-matching sigmas at u_i, shifted as FlowMatchEulerDiscreteScheduler (static or dynamic
    shift) or DPMSolverMultistepScheduler with flow sigmas (flow_shift) does."""
    u = _levels(n)
    if settings.get("use_dynamic_shifting"):
        base_seq, max_seq = settings.get("base_image_seq_len", 256), settings.get("max_image_seq_len", 4096)
        base, top = settings.get("base_shift", 0.5), settings.get("max_shift", 1.15)
        mu = base + (top - base) * (image_tokens - base_seq) / (max_seq - base_seq)
        scale = math.exp(mu) if settings.get("time_shift_type", "exponential") == "exponential" else mu
        return scale / (scale + (1 / u - 1)), f"dynamic shift mu {mu:.3f} ({image_tokens} image tokens)"
    shift = settings.get("flow_shift") if settings.get("use_flow_sigmas") else settings.get("shift")
    if shift is None:
        raise ValueError("the scheduler is not a flow-matching one (no shift, flow_shift or dynamic shifting)")
    return shift * u / (1 + (shift - 1) * u), f"shift {shift:g}"


def _flow_noisy(x0: torch.Tensor, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    s = sigma.float().view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen)


def _levels_text(values: torch.Tensor, name: str) -> str:
    return f"{name} [{', '.join(f'{v:.3g}' for v in values.tolist())}]"


def _pooled_like(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    return _text_like(n, 1, dim, gen)[:, 0]


def _prompt_mask(n: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = PROMPT_TOKENS
    valid = torch.randint(lo, hi + 1, (n,), generator=gen).clamp_max(seq)
    return (torch.arange(seq)[None, :] < valid[:, None]).long()


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def _expect(encoders: tuple, counts: tuple[int, ...], cls: str, order: str) -> None:
    if encoders and len(encoders) not in counts:
        raise ValueError(f"{cls} takes {' or '.join(map(str, counts))} text encoders ({order}), got {len(encoders)}")


@torch.no_grad()
def _encode(encoder: nn.Module, tokenizer: Any, n: int, length: int, masked: bool = False, **kwargs: Any):
    """(encoder output, attention mask) of the built-in prompts padded to `length` tokens; the mask
    goes to the encoder too when `masked` (PixArt's T5, SANA's Gemma-2), as the pipelines do."""
    tok = tokenizer(_prompts(n), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    mask = tok["attention_mask"]
    if masked:
        kwargs["attention_mask"] = mask.to(device)
    return encoder(tok["input_ids"].to(device), **kwargs), mask


def _width(t: torch.Tensor, expected: int, what: str, cls: str) -> torch.Tensor:
    if t.shape[-1] != expected:
        raise ValueError(f"{what} gives {t.shape[-1]}-d embeddings, the {cls} expects {expected}")
    return t.float().cpu()


def _real(encoders: tuple) -> str:
    return f"real embeddings of the built-in prompts ({', '.join(type(e).__name__ for e in encoders)})"


# -- families --------------------------------------------------------------------------------------


def _sd3(model, n, gen, latent_size, encoders, toks, scheduler) -> _Synth:
    cfg, cls = model.config, type(model).__name__
    p = cfg.patch_size
    side = _latent_side(model, latent_size, cfg.sample_size, p)
    tokens = (side // p) ** 2
    settings, sched = _scheduler_settings(scheduler, SD3_SCHEDULER)
    sigma, shift = _flow_sigmas(n, settings, tokens)
    x0 = _latent_like((n, cfg.in_channels, side, side), gen)
    noisy = _flow_noisy(x0, sigma, gen)
    joint, pooled_dim = cfg.joint_attention_dim, cfg.pooled_projection_dim
    _expect(encoders, (2, 3), cls, "CLIP-L, CLIP-G[, T5]")
    if encoders:
        outs = [_encode(e, t, n, CLIP_TOKENS, output_hidden_states=True)[0] for e, t in zip(encoders[:2], toks[:2])]
        clip = torch.cat([o.hidden_states[-2].float().cpu() for o in outs], dim=-1)
        pooled = _width(torch.cat([o[0].float() for o in outs], dim=-1), pooled_dim, "CLIP-L + CLIP-G", cls)
        t5 = (_width(_encode(encoders[2], toks[2], n, SD3_T5_TOKENS)[0][0], joint, "T5", cls)
              if len(encoders) == 3 else torch.zeros(n, SD3_T5_TOKENS, joint))  # the pipeline's zeros without T5
        cond = _real(encoders)
    else:
        clip = _text_like(n, CLIP_TOKENS, pooled_dim, gen)
        t5 = _text_like(n, SD3_T5_TOKENS, joint, gen)
        pooled = _pooled_like(n, pooled_dim, gen)
        cond = "synthetic text-embedding-like conditioning"
    if clip.shape[-1] > joint:
        raise ValueError(f"CLIP embeddings ({clip.shape[-1]}-d) are wider than joint_attention_dim ({joint})")
    hidden = torch.cat([nn.functional.pad(clip, (0, joint - clip.shape[-1])), t5], dim=1)
    kwargs = {"hidden_states": noisy, "encoder_hidden_states": hidden, "pooled_projections": pooled,
              "timestep": (1000 * sigma).float()}
    desc = (f"{n} noisy latent-like samples {cfg.in_channels}x{side}x{side} ({tokens} tokens), flow matching "
            f"at {_levels_text(sigma, 'sigmas')} ({sched}: {shift}; timestep = 1000 sigma); {cond}: "
            f"{CLIP_TOKENS} CLIP tokens x {clip.shape[-1]} zero-padded to {joint} + {SD3_T5_TOKENS} T5 tokens, "
            f"pooled {pooled_dim}")
    return _Synth(kwargs, tokens, None, desc)


def _flux(model, n, gen, latent_size, encoders, toks, scheduler) -> _Synth:
    cfg, cls = model.config, type(model).__name__
    if cfg.in_channels % 4:
        raise ValueError(f"{cls}: in_channels {cfg.in_channels} is not 4 x latent channels (2x2 packing)")
    c = cfg.in_channels // 4
    side = _latent_side(model, latent_size, FLUX_SAMPLE_SIZE, 2)
    h = w = side // 2
    tokens = h * w
    dev = bool(cfg.guidance_embeds)
    settings, sched = _scheduler_settings(scheduler, FLUX_DEV_SCHEDULER if dev else FLUX_SCHNELL_SCHEDULER)
    sigma, shift = _flow_sigmas(n, settings, tokens)
    x0 = _latent_like((n, c, side, side), gen)
    noisy = _flow_noisy(x0, sigma, gen)
    packed = noisy.view(n, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, tokens, 4 * c)  # _pack_latents
    seq = FLUX_T5_TOKENS[dev]
    _expect(encoders, (2,), cls, "CLIP-L, T5")
    if encoders:
        clip = _encode(encoders[0], toks[0], n, CLIP_TOKENS, output_hidden_states=False)[0].pooler_output
        pooled = _width(clip, cfg.pooled_projection_dim, "CLIP", cls)
        t5 = _width(_encode(encoders[1], toks[1], n, seq, output_hidden_states=False)[0][0],
                    cfg.joint_attention_dim, "T5", cls)
        cond = _real(encoders)
    else:
        t5 = _text_like(n, seq, cfg.joint_attention_dim, gen)
        pooled = _pooled_like(n, cfg.pooled_projection_dim, gen)
        cond = "synthetic text-embedding-like conditioning"
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    kwargs = {"hidden_states": packed, "encoder_hidden_states": t5, "pooled_projections": pooled,
              "timestep": sigma.float(), "img_ids": img_ids.reshape(tokens, 3), "txt_ids": torch.zeros(seq, 3)}
    if dev:
        kwargs["guidance"] = torch.full((n,), FLUX_GUIDANCE)
    desc = (f"{n} noisy latent-like samples {c}x{side}x{side} packed 2x2 into {tokens} tokens x {4 * c}, "
            f"flow matching at {_levels_text(sigma, 'sigmas')} ({sched}: {shift}; timestep = sigma"
            f"{f', guidance {FLUX_GUIDANCE:g}' if dev else ''}); {cond}: {seq} T5 tokens x "
            f"{cfg.joint_attention_dim}, pooled CLIP {cfg.pooled_projection_dim}")
    return _Synth(kwargs, tokens, None, desc)


def _masked_text(model, n, gen, seq, width, encoders, toks, order) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(embeddings, encoder attention mask, description) for the single-encoder families."""
    cls = type(model).__name__
    _expect(encoders, (1,), cls, order)
    if encoders:
        out, mask = _encode(encoders[0], toks[0], n, seq, masked=True)
        return _width(out[0], width, type(encoders[0]).__name__, cls), mask, _real(encoders)
    text = _text_like(n, seq, width, gen)
    mask = _prompt_mask(n, seq, gen)
    desc = (f"synthetic text-embedding-like conditioning, {PROMPT_TOKENS[0]}..{PROMPT_TOKENS[1]} valid tokens "
            f"{mask.sum(1).tolist()}")
    return text, mask, desc


def _pixart(model, n, gen, latent_size, encoders, toks, scheduler) -> _Synth:
    cfg = model.config
    side = _latent_side(model, latent_size, cfg.sample_size, cfg.patch_size)
    tokens = (side // cfg.patch_size) ** 2
    if scheduler is not None and getattr(scheduler, "alphas_cumprod", None) is not None:
        abar, sched = _alphas_cumprod(scheduler)
    else:
        start, end, steps = PIXART_BETAS
        abar = torch.cumprod(1 - torch.linspace(start, end, steps, dtype=torch.float64), 0)
        sched = f"linear {start:g}..{end:g} (PixArt default)"
    timesteps = torch.tensor([int((i + 0.5) * len(abar) / n) for i in range(n)], dtype=torch.long)
    x0 = _latent_like((n, cfg.in_channels, side, side), gen)
    a = abar[timesteps].float().view(n, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
    micro = bool(model.use_additional_conditions)
    seq = PIXART_TOKENS[micro]
    width = cfg.caption_channels or cfg.cross_attention_dim
    text, mask, cond = _masked_text(model, n, gen, seq, width, encoders, toks, "T5")
    if micro:  # PixArtAlphaPipeline: the image size in pixels and its aspect ratio
        px = float(VAE_SCALE * side)
        added = {"resolution": torch.tensor([[px, px]]).repeat(n, 1), "aspect_ratio": torch.ones(n, 1)}
    else:
        added = {"resolution": None, "aspect_ratio": None}
    kwargs = {"hidden_states": noisy, "encoder_hidden_states": text, "timestep": timesteps,
              "added_cond_kwargs": added, "encoder_attention_mask": mask}
    keep = cfg.in_channels if model.out_channels == 2 * cfg.in_channels else None
    desc = (f"{n} noisy latent-like samples {cfg.in_channels}x{side}x{side} ({tokens} tokens) at timesteps "
            f"{timesteps.tolist()} of {sched}; {cond}: {seq} tokens x {width}"
            f"{f', micro-conditions {int(px)}x{int(px)} px' if micro else ''}"
            f"{f'; output: the noise half (first {keep} channels) of the learned-sigma output' if keep else ''}")
    return _Synth(kwargs, tokens, keep, desc)


def _sana(model, n, gen, latent_size, encoders, toks, scheduler) -> _Synth:
    cfg, cls = model.config, type(model).__name__
    if cfg.guidance_embeds:
        raise ValueError(f"{cls} with guidance_embeds (SANA-Sprint, an SCM/TrigFlow schedule) is not synthesised; pass inputs=")
    side = _latent_side(model, latent_size, cfg.sample_size, cfg.patch_size)
    tokens = (side // cfg.patch_size) ** 2
    settings, sched = _scheduler_settings(scheduler, SANA_SCHEDULER)
    sigma, shift = _flow_sigmas(n, settings, tokens)
    x0 = _latent_like((n, cfg.in_channels, side, side), gen)
    noisy = _flow_noisy(x0, sigma, gen)
    text, mask, cond = _masked_text(model, n, gen, SANA_TOKENS, cfg.caption_channels, encoders, toks, "Gemma-2")
    timestep = torch.floor(1000 * sigma).float() * cfg.timestep_scale
    kwargs = {"hidden_states": noisy, "encoder_hidden_states": text, "timestep": timestep,
              "encoder_attention_mask": mask}
    desc = (f"{n} noisy latent-like samples {cfg.in_channels}x{side}x{side} ({tokens} tokens), flow matching "
            f"at {_levels_text(sigma, 'sigmas')} ({sched}: {shift}; timestep = floor(1000 sigma) x "
            f"{cfg.timestep_scale:g}); {cond}: {SANA_TOKENS} tokens x {cfg.caption_channels}")
    return _Synth(kwargs, tokens, None, desc)


# diffusers class name -> the family's input builder
_BUILDERS: dict[str, Callable[..., _Synth]] = {
    "SD3Transformer2DModel": _sd3, "FluxTransformer2DModel": _flux,
    "PixArtTransformer2DModel": _pixart, "SanaTransformer2DModel": _sana,
}
DIT_CLASSES: tuple[str, ...] = tuple(_BUILDERS)
