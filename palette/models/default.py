"""palette's embedded default model: a small text-conditioned diffusers ``UNet2DConditionModel``
trained here on procedural captioned scenes (``palette.models.data``), conditioned on the token
hidden states of the pretrained, frozen all-MiniLM-L6-v2, sampled with DPM-Solver++.

Pixel space: the UNet denoises 32x32 RGB images in [-1, 1] directly (epsilon prediction), so there
is no autoencoder. Classifier-free guidance: the empty prompt is the unconditional input.

Render a grid of samples: ``python -m palette.models.default --grid docs/default_samples.png``
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

from palette.models.data import from_tensor_range
from palette.models.minilm import load_minilm

WEIGHTS_DIR = Path(__file__).parent / "weights"
MAX_TOKENS = 16  # the longest caption is 15 MiniLM tokens with [CLS] and [SEP]
GUIDANCE_SCALE = 3.0
# The UNet's architecture; the training script builds it from this and saves it with the weights.
UNET_CONFIG: dict = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=384,
    attention_head_dim=32,
    norm_num_groups=8,
)
# Noise schedule shared by training (add_noise) and sampling.
SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
    # Pixel-space sampling under the cosine schedule: clamp the x0 predictions to the data range
    # (alpha_bar(999) is 2e-9, so the first x0 estimate is otherwise amplified ~1e4x) and start at
    # t=951 rather than 999.
    thresholding=True,
    sample_max_value=1.0,
    timestep_spacing="leading",
    steps_offset=1,
)


def make_unet(seed: int = 0) -> UNet2DConditionModel:
    """A freshly initialised (random-weight) UNet of the default architecture; leaves the global
    RNG state as it found it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(**UNET_CONFIG).eval()


def make_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)


def load_unet(dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The trained UNet, loaded by diffusers from the package's weights folder."""
    return UNet2DConditionModel.from_pretrained(
        WEIGHTS_DIR, torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=False
    ).eval()


@dataclass
class DefaultPipeline:
    """What sampling and probing need: UNet, frozen text encoder with tokenizer, scheduler."""

    unet: UNet2DConditionModel
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: DPMSolverMultistepScheduler
    guidance_scale: float = GUIDANCE_SCALE
    max_tokens: int = MAX_TOKENS  # every prompt is padded to this many tokens

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """MiniLM token hidden states ``(n, MAX_TOKENS, 384)`` float32, padded to MAX_TOKENS
        (padding positions are kept, computed with the attention mask, as in training)."""
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        return self.text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state

    @torch.no_grad()
    def sample(
        self, prompts: list[str], steps: int = 20, seed: int = 0, guidance_scale: float | None = None
    ) -> torch.Tensor:
        """Denoised images as float32 ``(n, 3, 32, 32)`` in [-1, 1]; runs the UNet in its own dtype.

        The initial noise comes from a CPU ``torch.Generator`` seeded with ``seed``, so the same
        seed gives bit-identical images on the same machine."""
        g = guidance_scale if guidance_scale is not None else self.guidance_scale
        dtype = self.unet.dtype
        n = len(prompts)
        cond = self.encode(list(prompts) + [""] * n if g != 1.0 else list(prompts)).to(dtype)
        size = self.unet.config.sample_size
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((n, self.unet.config.in_channels, size, size), generator=gen, dtype=torch.float32)
        scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]) if g != 1.0 else x, t).to(dtype)
            eps = self.unet(inp, t, encoder_hidden_states=cond).sample.float()
            if g != 1.0:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + g * (eps_c - eps_u)
            x = scheduler.step(eps, t, x).prev_sample
        return x.clamp(-1, 1)

    def __call__(self, prompts: list[str], steps: int = 20, seed: int = 0) -> np.ndarray:
        """uint8 images ``(n, 32, 32, 3)``."""
        return from_tensor_range(self.sample(prompts, steps, seed).numpy())


def load_default(dtype: torch.dtype = torch.float32) -> DefaultPipeline:
    """The embedded trained default model (a fresh UNet each call; MiniLM is loaded once, cached)."""
    text_encoder, tokenizer = load_minilm()
    scheduler = DPMSolverMultistepScheduler.from_pretrained(WEIGHTS_DIR, local_files_only=True)
    return DefaultPipeline(load_unet(dtype), text_encoder, tokenizer, scheduler)


def encode_prompts(prompts: list[str], pipeline: DefaultPipeline | None = None) -> torch.Tensor:
    """``encoder_hidden_states`` ``(n, 16, 384)`` for ``prompts`` (MiniLM token hidden states)."""
    if pipeline is None:
        text_encoder, tokenizer = load_minilm()
        pipeline = DefaultPipeline(None, text_encoder, tokenizer, None)  # type: ignore[arg-type]
    return pipeline.encode(prompts)


def generate(
    prompts: list[str],
    steps: int = 20,
    seed: int = 0,
    pipeline: DefaultPipeline | None = None,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Sample ``prompts`` with the default model: uint8 numpy ``(n, 32, 32, 3)`` (NHWC, RGB).

    ``dtype`` is the UNet's compute dtype when no ``pipeline`` is given (float16 runs the UNet with
    fp16 weights and activations); with a ``pipeline`` its UNet's own dtype is used."""
    pipe = pipeline if pipeline is not None else load_default(dtype)
    return pipe(prompts, steps=steps, seed=seed)


def default_probe_inputs(
    n: int = 8,
    seed: int = 0,
    timesteps: tuple[int, ...] = (999, 800, 600, 400, 200, 50),
    pipeline: DefaultPipeline | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Data-free probe inputs: one ``(sample, timestep, encoder_hidden_states)`` per timestep, for
    ``unet(sample, timestep, encoder_hidden_states).sample``.

    ``sample`` is ``(n, 3, 32, 32)``: procedural scenes of ``n`` held-out captions noised to that
    timestep with the training noise schedule (what the UNet sees during sampling, where
    ``scale_model_input`` is the identity for this scheduler); ``encoder_hidden_states`` are their
    real MiniLM embeddings; ``timestep`` is a ``(n,)`` long tensor."""
    from diffusers import DDPMScheduler

    from palette.models.data import render, sample_scenes, to_tensor_range

    scenes = sample_scenes(n, seed, split="held_out")
    clean = torch.from_numpy(to_tensor_range(render(scenes, seed)))
    cond = encode_prompts([s.caption for s in scenes], pipeline)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in timesteps:
        tt = torch.full((n,), int(t), dtype=torch.long)
        noise = torch.randn(clean.shape, generator=gen)
        out.append((noise_sched.add_noise(clean, noise, tt), tt, cond))
    return out


def render_grid(path: str | Path, prompts: list[str] | None = None, steps: int = 20, seed: int = 0) -> Path:
    """Write a PNG grid of samples with their captions (held-out captions by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from palette.models.data import held_out_captions

    if prompts is None:
        prompts = held_out_captions(24)
    images = generate(prompts, steps=steps, seed=seed)
    cols = 6
    rows = -(-len(prompts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.5))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, img, p in zip(np.ravel(axes), images, prompts):
        ax.imshow(img, interpolation="nearest")
        words = p.split(" in the ")
        ax.set_title(words[0] + "\nin the " + words[1] if len(words) == 2 else p, fontsize=7)
    fig.suptitle(f"palette default model: held-out captions, {steps} DPM-Solver++ steps, seed {seed}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="docs/default_samples.png", help="PNG path of the sample grid")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(render_grid(args.grid, steps=args.steps, seed=args.seed))


if __name__ == "__main__":
    main()
