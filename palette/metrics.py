"""Output-error metrics: Apple's latent PSNR, image PSNR, MSE, cosine similarity, and Spearman rank correlation.

Every per-sample metric treats the first dimension as the sample axis and averages over samples,
as Apple's ml-stable-diffusion pre-analysis does for PSNR.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PEAK_EPS = 1e-5
RMSE_EPS = 1e-10


def _flat(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs reference {tuple(ref.shape)}")
    if ref.dim() == 0:
        raise ValueError("metrics need at least one (sample) dimension")
    return x.detach().double().reshape(x.shape[0], -1), ref.detach().double().reshape(ref.shape[0], -1)


def psnr_from_mse(mse: np.ndarray | float, peak: np.ndarray | float) -> np.ndarray:
    """Apple's per-sample PSNR from per-sample MSE and peak max|ref|."""
    mse = np.maximum(np.asarray(mse, dtype=np.float64), 0.0)
    return 20 * np.log10((np.asarray(peak, dtype=np.float64) + PEAK_EPS) / (np.sqrt(mse) + RMSE_EPS))


def psnr_per_sample(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """`20*log10((max|ref| + 1e-5) / (sqrt(mean((x-ref)^2)) + 1e-10))` for each sample."""
    xf, rf = _flat(x, ref)
    mse = ((xf - rf) ** 2).mean(1).numpy()
    return psnr_from_mse(mse, rf.abs().amax(1).numpy())


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Apple's latent PSNR in dB: per sample (first dim), then averaged."""
    return float(psnr_per_sample(x, ref).mean())


def image_psnr(images: np.ndarray, ref: np.ndarray) -> float:
    """PSNR (dB, peak 255) of uint8 images against reference images, per image, averaged."""
    err = ((images.astype(np.float64) - ref.astype(np.float64)) ** 2).reshape(len(ref), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(err, 1e-10))))


def mse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean squared error over all elements."""
    xf, rf = _flat(x, ref)
    return float(((xf - rf) ** 2).mean())


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity per sample (flattened), averaged over samples."""
    xf, rf = _flat(x, ref)
    return float(torch.nn.functional.cosine_similarity(xf, rf, dim=1, eps=1e-12).mean())


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks starting at 0 with ties sharing their average rank."""
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(len(a), dtype=np.float64)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of tie-averaged ranks)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or len(a) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def significant(x: float | None, digits: int = 3) -> float | None:
    """`x` rounded to `digits` significant digits (None, 0 and non-finite values as they are).

    What drives a choice or is recorded in a file is rounded so, so that the float noise of a
    different reduction order (another torch thread count, another BLAS) does not change which
    spec a layer gets, nor the bytes of a recipe."""
    if x is None or x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")
