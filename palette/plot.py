"""Draw the PSNR-against-size figure of Apple's mixed-bit palettization pre-analysis from measured
points (`palette.experiments.psnr_size_curve`); nothing here runs a model."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .experiments import Curve

MB = 1e6


def plot_psnr_vs_size(
    path: str | os.PathLike, curve: Curve, extra: Mapping[str, Sequence[tuple[int, float]]] | None = None
) -> Path:
    """Write a PNG of measured PSNR (dB) against whole-model size (MB): uniform k-means, linear
    8-bit, palette's mixed bits (measured, and predicted dashed), and any `extra` measured series
    {label: [(size_bytes, psnr)]}, e.g. another method's recipes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_series(path: str | os.PathLike, series: Mapping[str, Sequence[tuple[int, float]]], title: str,
                ylabel: str = "image PSNR vs. 16-bit (dB)") -> Path:
    """Write a PNG of measured PSNR against size (MB), one line per series {label: [(bytes, psnr)]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([s / MB for s, _ in pts], [p for _, p in pts], "o-", label=label)
    ax.set_xlabel("whole pipeline as stored (MB)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
