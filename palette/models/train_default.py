"""Train palette's default model on CPU, deterministically from a fixed seed, and write it into
``palette/models/weights/``: UNet (config.json + diffusion_pytorch_model.safetensors), scheduler
config, caption checker, training config, loss log and loss curve.

    python -m palette.models.train_default            # the shipped weights
    python -m palette.models.train_default --steps 20 --out /tmp/w   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm import tqdm

from palette.models import checker as checker_mod
from palette.models.data import all_scenes, render, sample_scenes, split_scenes, to_tensor_range
from palette.models.default import (
    MAX_TOKENS,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    WEIGHTS_DIR,
    DefaultPipeline,
    make_scheduler,
    make_unet,
)
from palette.models.minilm import load_minilm


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1750
    batch: int = 24
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 1e-4
    ema_decay: float = 0.995
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting: faster convergence (Hang et al. 2023)
    # Noisy end: weight the epsilon loss by 1/SNR (capped here) where SNR < 1, i.e. x0-space weight 1.
    # Epsilon prediction carries x0 with a factor sqrt(SNR) only, so unweighted it barely learns the
    # conditional mean at high noise, where background and position are decided.
    max_eps_weight: float = 20.0
    caption_dropout: float = 0.1  # empty-prompt rate, for classifier-free guidance
    checker_steps: int = 400
    threads: int = 2  # the weights depend on the thread count (reductions split per thread)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def loss_weight(snr: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Epsilon-loss weight: x0-space weight clamp(SNR, 1, gamma) (Min-SNR at the clean end,
    truncated SNR at the noisy end), expressed for the epsilon loss and capped at max_eps_weight."""
    return torch.minimum(cfg.min_snr_gamma / snr, torch.clamp(1 / snr, min=1.0, max=cfg.max_eps_weight))


def train(cfg: TrainConfig, out: Path) -> dict:
    """Train the checker and the UNet; write everything to ``out``; return a summary."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()

    checker = checker_mod.train_checker(cfg.checker_steps, seed=cfg.seed)
    checker_mod.save_checker(checker, out / "checker.safetensors")
    x, y = checker_mod._batch(2000, 999_999, noise=0.0)
    with torch.no_grad():
        pred = checker(x)
    checker_acc = {k: float((pred[k].argmax(1) == y[k]).float().mean()) for k in y}
    t_checker = time.perf_counter() - t_start

    # Frozen text encoder: embed every caption once (index len(scenes) is the empty prompt).
    text_encoder, tokenizer = load_minilm()
    scenes = all_scenes()
    index = {s: i for i, s in enumerate(scenes)}
    enc = DefaultPipeline(None, text_encoder, tokenizer, None)  # type: ignore[arg-type]
    table = torch.cat([enc.encode([s.caption for s in scenes[i : i + 96]]) for i in range(0, len(scenes), 96)])
    table = torch.cat([table, enc.encode([""])])
    assert table.shape == (len(scenes) + 1, MAX_TOKENS, 384)

    unet = make_unet(cfg.seed).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_sched = DDPMScheduler(
        num_train_timesteps=SCHEDULER_CONFIG["num_train_timesteps"], beta_schedule=SCHEDULER_CONFIG["beta_schedule"]
    )
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    log: list[dict] = []
    t_unet = time.perf_counter()
    for step in (bar := tqdm(range(cfg.steps), desc="unet")):
        batch_scenes = sample_scenes(cfg.batch, seed=10**6 + step, split="train")
        clean = torch.from_numpy(to_tensor_range(render(batch_scenes, seed=2 * 10**6 + step)))
        ids = torch.tensor([index[s] for s in batch_scenes])
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        cond = table[torch.where(drop, len(scenes), ids)]
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
        noise = torch.randn(clean.shape, generator=gen)
        noisy = noise_sched.add_noise(clean, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        eps = unet(noisy, t, encoder_hidden_states=cond).sample
        weight = loss_weight(snr[t], cfg)
        loss = (weight * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        log.append({"step": step, "loss": loss.item(), "lr": lr_at(step, cfg), "time_s": time.perf_counter() - t_start})
        bar.set_postfix(loss=f"{loss.item():.4f}")
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start

    ema.save_pretrained(out, safe_serialization=True)
    make_scheduler().save_pretrained(out)
    losses = np.array([r["loss"] for r in log])
    final = float(losses[-100:].mean())
    summary = {
        "config": asdict(cfg),
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
        "scheduler_config": SCHEDULER_CONFIG,
        "train_captions": len(split_scenes()[0]),
        "held_out_captions": len(split_scenes()[1]),
        "unet_parameters": sum(p.numel() for p in ema.parameters()),
        "checker_accuracy_fresh_2000": checker_acc,
        "checker_wall_time_s": round(t_checker, 1),
        "unet_wall_time_s": round(wall - (t_unet - t_start), 1),
        "total_wall_time_s": round(wall, 1),
        # CPU time of this process: what the run costs on an unshared machine (wall time above
        # includes waiting for cores that other jobs held).
        "total_cpu_time_s": round(cpu, 1),
        "final_loss_mean_last_100": final,
        "torch": torch.__version__,
    }
    (out / "train_config.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "loss_log.json").write_text(json.dumps(log) + "\n")
    _plot_loss(losses, out / "loss_curve.png")
    return summary


def _plot_loss(losses: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.5, alpha=0.4, label="per step")
    k = 50
    if len(losses) > k:
        ax.plot(np.arange(k - 1, len(losses)), np.convolve(losses, np.ones(k) / k, "valid"), label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("Min-SNR-weighted epsilon MSE")
    ax.set_title("palette default UNet: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description="Train palette's default model (CPU, deterministic).")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--checker-steps", type=int, default=TrainConfig.checker_steps)
    ap.add_argument("--max-eps-weight", type=float, default=TrainConfig.max_eps_weight)
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = ap.parse_args()
    cfg = TrainConfig(
        steps=args.steps, checker_steps=args.checker_steps, max_eps_weight=args.max_eps_weight, threads=args.threads
    )
    summary = train(cfg, args.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
