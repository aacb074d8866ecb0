"""coremltools' own k-means palettization, called as its `palettize_weights` pass calls it.

The reference for parity tests and benchmarks: `blockwise_compress` with mode KMEANS clusters
each group of output channels with `_get_kmeans_lookup_table_and_weight` (exact `kmeans1d` for
fp16 groups of >= 10,000 elements when that package is installed, scikit-learn's k-means
otherwise) and `decompress` expands LUT[indices].
"""

from __future__ import annotations

import logging

import numpy as np

logging.getLogger("coremltools").setLevel(logging.ERROR)

from coremltools.models.neural_network.quantization_utils import (  # noqa: E402
    _get_kmeans_lookup_table_and_weight,
)
from coremltools.optimize.coreml._quantization_passes import palettize_weights  # noqa: E402


def coreml_palettize(
    w16: np.ndarray, nbits: int, granularity: str = "per_tensor", group_size: int = 16
) -> np.ndarray:
    """Dense fp16 weight after coremltools' k-means palettization (output channels on axis 0)."""
    block_sizes = [0] * w16.ndim
    if granularity == "per_grouped_channel":
        block_sizes[0] = group_size
    params = palettize_weights.blockwise_compress(w16, "KMEANS", nbits, block_sizes)
    if params is None:
        raise ValueError(f"coremltools skipped this weight (group_size {group_size}, {w16.shape})")
    return palettize_weights.decompress(params).astype(np.float16).reshape(w16.shape)


def coreml_kmeans_groups(w16: np.ndarray, nbits: int, group_size: int | None) -> np.ndarray:
    """The same, tensor by tensor and group by group through the k-means routine itself: the
    call the benchmark times (no MIL pass overhead)."""
    groups = [w16] if group_size is None else np.split(w16, w16.shape[0] // group_size, axis=0)
    out = []
    for g in groups:
        lut, idx = _get_kmeans_lookup_table_and_weight(nbits, g)
        out.append(lut.astype(np.float16).reshape(-1)[np.asarray(idx).reshape(g.shape)])
    return np.concatenate(out, axis=0)
