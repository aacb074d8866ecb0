"""The caption checker: a small CNN trained on procedural scenes that reads every attribute
(shape, colour, size, position, background) back from a 32x32 image. It judges whether samples
follow their captions; it is trained on rendered scenes only, never on model samples."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from palette.models.data import ATTRIBUTES, Scene, render, sample_scenes, to_tensor_range

CHECKER_PATH = Path(__file__).parent / "weights" / "checker.safetensors"
HEADS = {name: len(values) for name, values in ATTRIBUTES.items()}


class Checker(nn.Module):
    """Three conv stages and one linear head per attribute; input NCHW float in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*stage(3, 32), *stage(32, 64), *stage(64, 64), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, v) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hidden(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}


def _batch(n: int, seed: int, noise: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rendered scenes of all 576 captions, with Gaussian pixel noise of std up to ``noise`` so the
    checker tolerates the slight grain of diffusion samples."""
    scenes = sample_scenes(n, seed, split="all")
    x = torch.from_numpy(to_tensor_range(render(scenes, seed)))
    if noise > 0:
        g = torch.Generator().manual_seed(seed)
        x = x + torch.rand((n, 1, 1, 1), generator=g) * noise * torch.randn(x.shape, generator=g)
    labels = torch.tensor([s.as_tuple() for s in scenes])
    return x, {k: labels[:, i] for i, k in enumerate(HEADS)}


def train_checker(steps: int = 600, batch: int = 64, seed: int = 0, noise: float = 0.15) -> Checker:
    """Train the checker on fresh procedural batches (seeds ``seed*10**6 + step``)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = Checker()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for step in (bar := tqdm(range(steps), desc="checker")):
        x, y = _batch(batch, seed * 10**6 + step, noise)
        out = model(x)
        loss = sum(nn.functional.cross_entropy(out[k], y[k]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def save_checker(model: Checker, path: Path = CHECKER_PATH) -> None:
    save_file(model.state_dict(), str(path))


@lru_cache(maxsize=1)
def load_checker(path: Path = CHECKER_PATH) -> Checker:
    model = Checker()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def classify(images: np.ndarray, model: Checker | None = None) -> dict[str, np.ndarray]:
    """Predicted attribute indices for uint8 NHWC images: ``{attribute: (n,) int array}``."""
    model = model if model is not None else load_checker()
    out = model(torch.from_numpy(to_tensor_range(images)))
    return {k: v.argmax(1).numpy() for k, v in out.items()}


def score(images: np.ndarray, scenes: list[Scene], model: Checker | None = None) -> dict[str, float]:
    """Fraction of images whose predicted attribute equals the caption's, per attribute, plus
    ``shape+colour`` (both right: the caption-following figure) and ``all`` (every attribute)."""
    pred = classify(images, model)
    truth = np.array([s.as_tuple() for s in scenes]).reshape(len(scenes), 5)
    hits = {k: pred[k] == truth[:, i] for i, k in enumerate(HEADS)}
    res = {k: float(v.mean()) for k, v in hits.items()}
    res["shape+colour"] = float((hits["shape"] & hits["colour"]).mean())
    res["all"] = float(np.logical_and.reduce(list(hits.values())).mean())
    return res


def chance() -> dict[str, float]:
    """Chance level of each figure of ``score`` (uniform guessing)."""
    res = {k: 1.0 / v for k, v in HEADS.items()}
    res["shape+colour"] = res["shape"] * res["colour"]
    res["all"] = float(np.prod([1.0 / v for v in HEADS.values()]))
    return res
