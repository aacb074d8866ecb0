"""Procedural captioned scenes: 32x32 RGB images of one coloured shape on a plain background,
generated deterministically from a seed (nothing is downloaded).

A scene is (shape, colour, size, position, background); its caption reads
"a small red circle in the top left on a black background". Of the 576 attribute combinations,
``N_HELD_OUT`` whole captions are held out: never seen in training, used to judge the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SIZE_PX = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "magenta": (210, 40, 210),
    "cyan": (30, 210, 220),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"black": (20, 20, 20), "white": (235, 235, 235), "gray": (128, 128, 128)}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
# Attribute name -> its values, in the order of the fields of `Scene`.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUND_NAMES,
}
N_HELD_OUT = 72
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Scene:
    """Indices into SHAPES, COLOUR_NAMES, SIZES, POSITIONS, BACKGROUND_NAMES."""

    shape: int
    colour: int
    size: int
    position: int
    background: int

    @property
    def caption(self) -> str:
        return (
            f"a {SIZES[self.size]} {COLOUR_NAMES[self.colour]} {SHAPES[self.shape]} "
            f"in the {POSITIONS[self.position]} on a {BACKGROUND_NAMES[self.background]} background"
        )

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.shape, self.colour, self.size, self.position, self.background)


def all_scenes() -> list[Scene]:
    """Every attribute combination, in a fixed order."""
    dims = [len(v) for v in ATTRIBUTES.values()]
    return [Scene(*map(int, idx)) for idx in np.ndindex(*dims)]


@lru_cache(maxsize=1)
def split_scenes() -> tuple[tuple[Scene, ...], tuple[Scene, ...]]:
    """``(train, held_out)``: a fixed random ``N_HELD_OUT`` whole captions are held out."""
    scenes = all_scenes()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(scenes))
    held = sorted(order[:N_HELD_OUT].tolist())
    train = sorted(order[N_HELD_OUT:].tolist())
    return tuple(scenes[i] for i in train), tuple(scenes[i] for i in held)


def held_out_captions(n: int) -> list[str]:
    """The first `n` held-out captions: the prompts the demo and `palette compare --grid` sample."""
    return [s.caption for s in split_scenes()[1][:n]]


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """``n`` scenes drawn uniformly (with replacement) from a split ("train", "held_out", "all")."""
    train, held = split_scenes()
    pool = {"train": train, "held_out": held, "all": train + held}[split]
    idx = np.random.default_rng(seed).integers(0, len(pool), size=n)
    return [pool[i] for i in idx]


def render(scenes: list[Scene], seed: int) -> np.ndarray:
    """Images of ``scenes`` as uint8 ``(n, 32, 32, 3)``; position, size and colour jitter from ``seed``."""
    n = len(scenes)
    rng = np.random.default_rng(seed)
    a = np.array([s.as_tuple() for s in scenes], dtype=np.int64).reshape(n, 5)
    shape, colour, size, position, background = a.T
    half = SIZE_PX / 2
    cx = np.where(position % 2 == 1, 1.5 * half, 0.5 * half) + rng.uniform(-1.5, 1.5, n)
    cy = np.where(position >= 2, 1.5 * half, 0.5 * half) + rng.uniform(-1.5, 1.5, n)
    r = np.where(size == 1, rng.uniform(6.5, 7.5, n), rng.uniform(4.5, 5.5, n))
    fg = np.array(list(COLOURS.values()), dtype=np.float64)[colour] + rng.uniform(-15, 15, (n, 3))
    bg = np.array(list(BACKGROUNDS.values()), dtype=np.float64)[background] + rng.uniform(-10, 10, (n, 3))

    grid = np.arange(SIZE_PX) + 0.5
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    rr = r[:, None, None]
    adx, ady = np.abs(dx), np.abs(dy)
    masks = {
        0: dx**2 + dy**2 <= rr**2,
        1: np.maximum(adx, ady) <= 0.85 * rr,
        2: (dy >= -rr) & (dy <= 0.8 * rr) & (adx <= (dy + rr) / 1.8),
        3: ((adx <= 0.35 * rr) & (ady <= rr)) | ((ady <= 0.35 * rr) & (adx <= rr)),
    }
    mask = np.zeros((n, SIZE_PX, SIZE_PX), dtype=bool)
    for k, m in masks.items():
        mask |= m & (shape == k)[:, None, None]
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_tensor_range(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1], the diffusion model's pixel space."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def from_tensor_range(x: np.ndarray) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    return np.clip(np.rint((x.transpose(0, 2, 3, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
