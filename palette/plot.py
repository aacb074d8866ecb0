"""Draw measured figures; nothing here runs a model: the PSNR-against-size figure of Apple's
mixed-bit palettization pre-analysis (`palette.experiments.psnr_size_curve`), labelled recipes
against size (`palette.compare`), and a grid of samples, one row per variant (the demo's)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .experiments import Curve

MB = 1e6


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lay out, write and close `fig`; the PNG's path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_psnr_vs_size(
    path: str | os.PathLike, curve: Curve, extra: Mapping[str, Sequence[tuple[int, float]]] | None = None
) -> Path:
    """Write a PNG of measured PSNR (dB) against whole-model size (MB): uniform k-means, linear
    8-bit, palette's mixed bits (measured, and predicted dashed), and any `extra` measured series
    {label: [(size_bytes, psnr)]}, e.g. another method's recipes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.plot([s / MB for s, _, _ in curve.uniform], [p for _, p, _ in curve.uniform], "o-", color="tab:gray",
            label="uniform k-means, per tensor")
    for s, p, b in curve.uniform:
        ax.annotate(f"{b}b", (s / MB, p), textcoords="offset points", xytext=(4, -10), fontsize=8, color="tab:gray")
    ax.plot(curve.int8[0] / MB, curve.int8[1], "bx", markersize=9, label="linear 8-bit (symmetric, per channel)")
    ax.axhline(curve.int8[1], color="b", ls=":", lw=0.8)
    ax.plot([s / MB for s, _, _ in curve.mixed], [p for _, p, _ in curve.mixed], "o-", color="tab:red",
            label="palette mixed-bit (measured)")
    ax.plot([s / MB for s, _, _ in curve.mixed], [q for _, _, q in curve.mixed], "--", color="tab:red", alpha=0.6,
            label="palette mixed-bit (predicted)")
    for label, pts in (extra or {}).items():
        pts = sorted(pts)
        ax.plot([s / MB for s, _ in pts], [p for _, p in pts], "s-", ms=4, label=label)
    ax.axvline(curve.full_bytes / MB, color="k", ls=":", lw=0.8)
    ax.annotate("16-bit", (curve.full_bytes / MB, ax.get_ylim()[0]), textcoords="offset points", xytext=(-34, 4),
                fontsize=8)
    ax.set_xlabel("model size as stored (MB)")
    ax.set_ylabel("output PSNR vs. original (dB)")
    ax.set_title(curve.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_recipes(
    path: str | os.PathLike,
    points: Sequence[tuple[str, int, float, float, float]],
    full_bytes: int,
    title: str,
) -> Path:
    """Write a PNG of measured PSNR (dB) against whole-model size (MB), one labelled point per
    recipe: `points` are (label, size_bytes, mean PSNR, lowest and highest per-sample PSNR), the
    per-sample range drawn as a bar; the 16-bit size (`full_bytes`) as a dotted line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (label, size, mean, low, high) in enumerate(points):
        color = f"C{i % 10}"
        ax.errorbar(size / MB, mean, yerr=[[mean - low], [high - mean]], fmt="o", color=color, capsize=3,
                    label=f"{label}: {mean:.2f} dB, {size / MB:.3f} MB")
        ax.annotate(label, (size / MB, mean), textcoords="offset points", xytext=(6, 4), fontsize=8, color=color)
    ax.axvline(full_bytes / MB, color="k", ls=":", lw=0.8)
    ax.annotate("16-bit", (full_bytes / MB, ax.get_ylim()[0]), textcoords="offset points", xytext=(-34, 4),
                fontsize=8)
    ax.set_xlabel("model size as stored (MB)")
    ax.set_ylabel("output PSNR vs. original (dB); bars: per-sample range")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def row_label(name: str, size_bytes: int, bits_per_weight: float, psnr: float | None = None) -> str:
    """A sample-grid row's label: name, size, bits per weight, and the latent PSNR if measured."""
    label = f"{name}\n{size_bytes / MB:.2f} MB, {bits_per_weight:.2f} b/w"
    return label if psnr is None else label + f"\nlatent {psnr:.1f} dB"


def write_grid(path: str | os.PathLike, rows: Sequence[tuple[str, np.ndarray]], prompts: Sequence[str],
               title: str) -> Path:
    """Write a PNG of samples: one row per (label, uint8 images NHWC) in `rows`, one column per
    prompt (captions on top)."""
    plt = _pyplot()
    n_rows, cols = len(rows), len(prompts)
    fig, axes = plt.subplots(n_rows, cols, figsize=(1.9 * cols + 1.6, 2.0 * n_rows + 0.9), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(imgs[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(prompts[c].replace(" in the ", "\nin the ").replace(" on a ", "\non a "), fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=7.5, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi=110)


def plot_series(path: str | os.PathLike, series: Mapping[str, Sequence[tuple[int, float]]], title: str,
                ylabel: str = "image PSNR vs. 16-bit (dB)") -> Path:
    """Write a PNG of measured PSNR against size (MB), one line per series {label: [(bytes, psnr)]}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([s / MB for s, _ in pts], [p for _, p in pts], "o-", label=label)
    ax.set_xlabel("whole pipeline as stored (MB)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)
