"""A whole text-to-image pipeline as one module, and its data-free probe inputs.

`PipelineOutput` holds the components under their names (`text_encoder`, `unet`, optionally
`vae_decoder`) and maps data-free inputs -- token ids and masks of prompts, and seeded initial
noise -- to the generated image: encode the prompts (and the empty prompt, for classifier-free
guidance) -> `steps` sampler steps with the pipeline's own scheduler -> decode with the VAE decoder
where there is one -> clamp to [-1, 1]. Every layer of every component is then a target layer of
one module (named `text_encoder.…`, `unet.…`, `vae_decoder.…`), so `probe_sensitivity` measures
each one's error on the one output the user sees, and one knapsack allocates them all.

Every component sees the sample axis as its first dimension: the conditional and unconditional
halves of guidance run as two calls, not one doubled batch, so per-sample gradients stay per sample
(the probe's hooks add a layer's gradients over its calls: the denoiser runs 2 x `steps` times).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .inputs import PROMPTS, ProbeSet, _call_unit, main_output

TEXT_ENCODER = "text_encoder"
DENOISER = "unet"
DECODER = "vae_decoder"
COMPONENTS = (TEXT_ENCODER, DENOISER, DECODER)
PROBE_STEPS = 4  # sampler steps of the probe's pipeline runs (validation runs the full count)
# Prompts (one seed each) of a pipeline's probe. A layer's error on the image varies far more across
# prompts and seeds than on one model's output: on the default pipeline, 64 prompts rank layers well
# enough for the joint recipe to beat every budget split, 4 to 16 do not (RESULTS, pipeline budget).
PIPELINE_SAMPLES = 64


class VaeDecoder(nn.Module):
    """The part of a VAE that runs on device: latents -> image (post_quant_conv, then decoder),
    named as in the VAE so that recipes match Apple's module names."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder
        self.latent_channels = vae.config.latent_channels
        self.sample_size = vae.config.sample_size
        self.scaling_factor = vae.config.scaling_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def check_components(components: Mapping[str, Any]) -> None:
    """ValueError unless the names are known, there is a denoiser and a text encoder, and every
    component is a torch module."""
    unknown = [n for n in components if n not in COMPONENTS]
    if unknown:
        hint = (" (a diffusion transformer goes under 'unet', with the pipeline's own call as 'denoise(x, t, "
                "text_states)'; pipelines of several text encoders, as SD3's and FLUX's, are not supported yet)"
                if "transformer" in unknown else "")
        raise ValueError(f"unknown pipeline component(s) {unknown}{hint}: a pipeline has {list(COMPONENTS)}")
    for need in (DENOISER, TEXT_ENCODER):
        if components.get(need) is None:
            raise ValueError(f"the pipeline has no {need!r}: joint allocation needs a text encoder and a "
                             f"denoiser (got {sorted(components)})")
    wrong = [n for n, m in components.items() if m is not None and not isinstance(m, nn.Module)]
    if wrong:
        raise ValueError(f"pipeline component(s) {wrong} are not torch modules")


class PipelineOutput(nn.Module):
    """Prompts and seeded noise -> the pipeline's image, through every component (see module doc).

    `tokenizer` and `scheduler` are the pipeline's own (the scheduler is copied from its config at
    every call, so the pipeline's is never stepped); `max_tokens` pads every prompt to that many
    tokens (default: the tokenizer's `model_max_length`); `attention_mask` passes the mask to the
    text encoder (MiniLM: yes; SD's CLIP: no); `denoise(x, t, text_states)` is how the pipeline calls
    its denoiser (default: a UNet's `unet(x, t, encoder_hidden_states=...)`), e.g. a diffusion
    transformer with its pooled text embedding."""

    def __init__(
        self,
        components: Mapping[str, nn.Module | None],
        tokenizer: Any,
        scheduler: Any,
        *,
        steps: int = PROBE_STEPS,
        guidance_scale: float = 1.0,
        max_tokens: int | None = None,
        attention_mask: bool = False,
        sample_size: int | None = None,
        denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> None:
        super().__init__()
        check_components(components)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        for name in COMPONENTS:
            if components.get(name) is not None:
                self.add_module(name, components[name])
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.steps, self.guidance_scale = int(steps), float(guidance_scale)
        self.max_tokens = max_tokens or getattr(tokenizer, "model_max_length", 77)
        self.attention_mask = attention_mask
        self.denoise = denoise
        cfg = self.unet.config
        self.sample_size = int(sample_size or cfg.sample_size)

    @property
    def components(self) -> dict[str, nn.Module]:
        return {n: getattr(self, n) for n in COMPONENTS if hasattr(self, n)}

    def with_steps(self, steps: int) -> "PipelineOutput":
        """The same components (shared, not copied) run with another number of sampler steps."""
        return PipelineOutput(self.components, self.tokenizer, self.scheduler, steps=steps,
                              guidance_scale=self.guidance_scale, max_tokens=self.max_tokens,
                              attention_mask=self.attention_mask, sample_size=self.sample_size,
                              denoise=self.denoise)

    # -- inputs --------------------------------------------------------------------------------
    def tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"]

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Initial noise, one CPU generator per sample: a sample's noise depends on its seed only."""
        channels = self.unet.config.in_channels
        size = (channels, self.sample_size, self.sample_size)
        return torch.stack([torch.randn(size, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def inputs(self, prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        """Keyword inputs of `forward` for these prompts and seeds (one sample each)."""
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(f"need as many seeds as prompts (at least one), got {len(prompts)} and {len(seeds)}")
        ids, mask = self.tokens(prompts)
        uids, umask = self.tokens([""] * len(prompts))
        return {"input_ids": ids, "attention_mask": mask, "uncond_ids": uids, "uncond_mask": umask,
                "noise": self.noise(seeds)}

    def probe_set(self, prompts: Sequence[str] | None = None, seed: int = 0, n_samples: int = PIPELINE_SAMPLES,
                  batch_size: int = 4) -> ProbeSet:
        """Data-free probe units: `n_samples` prompts (the given ones, else the built-in list, in
        turn) with seeds `seed`, `seed + 1`, ..., in batches of `batch_size`."""
        if n_samples < 1 or batch_size < 1:
            raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}")
        source = list(prompts) if prompts else list(PROMPTS)
        chosen = [source[i % len(source)] for i in range(n_samples)]
        units = []
        for start in range(0, n_samples, batch_size):
            sl = slice(start, min(start + batch_size, n_samples))
            units.append(_call_unit((), self.inputs(chosen[sl], list(range(seed + sl.start, seed + sl.stop)))))
        desc = (f"pipeline: {n_samples} {'given' if prompts else 'built-in'} prompts, seeds {seed}..{seed + n_samples - 1}, "
                f"{self.steps} {type(self.scheduler).__name__} steps, guidance {self.guidance_scale:g}; output: "
                f"the image{' decoded by the VAE' if hasattr(self, DECODER) else ''}")
        return ProbeSet(tuple(units), desc, batch_size, n_samples)

    @torch.no_grad()
    def example_inputs(self, prompt: str = "a red circle", seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per component, the positional inputs it gets in this pipeline (batch of 1), for tracing to
        Core ML. A text encoder given an attention mask gets it as the prepared additive mask
        (batch, 1, 1, tokens): 0 where a token is attended, the dtype's minimum where it is padding
        (transformers' builder of that mask from the 0/1 one does not convert to Core ML)."""
        if self.denoise is not None:
            raise ValueError("this pipeline calls its denoiser its own way (a diffusion transformer): export "
                             "the denoiser on its own with its example inputs (export_coreml, or palette export "
                             "--subfolder transformer)")
        ids, mask = self.tokens([prompt])
        cond = self.encode(ids, mask).to(self.unet.dtype)
        noise = self.noise([seed]).to(self.unet.dtype)
        t = torch.tensor([float(self.scheduler.config.num_train_timesteps // 2)])
        dtype = next(self.text_encoder.parameters()).dtype
        additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        out = {TEXT_ENCODER: (ids, additive) if self.attention_mask else (ids,), DENOISER: (noise, t, cond)}
        if hasattr(self, DECODER):
            out[DECODER] = (noise.to(self.vae_decoder_dtype),)
        return out

    # -- the pipeline ----------------------------------------------------------------------------
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"attention_mask": mask} if self.attention_mask else {}
        return main_output(self.text_encoder(input_ids=ids, **kwargs))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, uncond_ids: torch.Tensor,
                uncond_mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        guided = self.guidance_scale != 1.0
        cond = self.encode(input_ids, attention_mask).to(dtype)
        uncond = self.encode(uncond_ids, uncond_mask).to(dtype) if guided else None
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(self.steps)
        x = noise.float() * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching: unscaled noise
        for t in scheduler.timesteps:
            inp = (scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x).to(dtype)
            eps = self._denoised(inp, t, cond)
            if guided:
                eps_u = self._denoised(inp, t, uncond)
                eps = eps_u + self.guidance_scale * (eps - eps_u)
            x = scheduler.step(eps, t, x).prev_sample
        if hasattr(self, DECODER):
            x = main_output(self.vae_decoder((x / self.vae_decoder.scaling_factor).to(self.vae_decoder_dtype)))
        return x.float().clamp(-1, 1)

    def _denoised(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.denoise is None:
            return main_output(self.unet(x, t, encoder_hidden_states=cond))
        return main_output(self.denoise(x, t, cond))

    @property
    def vae_decoder_dtype(self) -> torch.dtype:
        return next(self.vae_decoder.parameters()).dtype


__all__ = ["COMPONENTS", "PROBE_STEPS", "PipelineOutput", "VaeDecoder", "check_components"]
