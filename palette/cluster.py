"""One weight tensor -> `Palette`: exact 1D k-means on fp16 values, or vector k-means (faiss).

No torch.nn knowledge here: a weight is a tensor whose axis 0 is the output channels.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import _exact1d
from ._interrupt import deferred
from .spec import PaletteSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class Palette:
    """A palettized weight in Core ML's layout.

    lut:     float16 (groups, 2^nbits, cluster_dim); groups of `group_size` output channels.
    indices: uint8 (out_channels // cluster_dim, *weight.shape[1:]); a vector index covers
             `cluster_dim` consecutive output channels at one position.
    scale:   float16 (out_channels,) when `spec.per_channel_scale`, else None.
    """

    lut: torch.Tensor
    indices: torch.Tensor
    spec: PaletteSpec
    scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight this palette reproduces."""
        return (self.indices.shape[0] * self.spec.cluster_dim, *self.indices.shape[1:])

    @property
    def nbytes(self) -> int:
        """Exact stored size: bit-packed indices, fp16 LUTs and scales."""
        return self.spec.nbytes(self.shape)

    def dequantize(self) -> torch.Tensor:
        """The fake-palettized fp16 weight, LUT[indices] (times the scale): what Core ML computes."""
        groups, _, d = self.lut.shape
        out_channels = self.shape[0]
        rows = out_channels // d
        idx = self.indices.reshape(rows, -1).long()
        rows_per_group = rows // groups
        group_of_row = torch.arange(rows) // rows_per_group
        vals = self.lut[group_of_row[:, None], idx]  # rows x positions x d
        w = vals.permute(0, 2, 1).reshape(out_channels, -1)
        if self.scale is not None:
            w = (w.float() * self.scale.float()[:, None]).half()
        return w.reshape(self.shape)


def check_palette(pal: Palette, name: str, weight_shape: tuple[int, ...] | None = None) -> None:
    """Raise ValueError if `pal` is not a well-formed palette (of a weight of `weight_shape`)."""
    if not isinstance(pal, Palette):
        raise ValueError(f"{name}: expected a Palette, got {type(pal).__name__}")
    spec = pal.spec
    shape = pal.shape
    if weight_shape is not None and (
        shape[0] != weight_shape[0] or math.prod(shape) != math.prod(weight_shape)
    ):
        raise ValueError(f"{name}: palette shape {shape} does not fit weight shape {weight_shape}")
    groups = spec.n_groups(shape[0], name)
    want_lut = (groups, spec.n_entries, spec.cluster_dim)
    if pal.lut.dtype != torch.float16 or tuple(pal.lut.shape) != want_lut:
        raise ValueError(
            f"{name}: LUT must be float16 of shape {want_lut}, got {pal.lut.dtype} {tuple(pal.lut.shape)}"
        )
    if pal.indices.dtype != torch.uint8:
        raise ValueError(f"{name}: indices must be uint8, got {pal.indices.dtype}")
    if pal.indices.numel() and int(pal.indices.max()) >= spec.n_entries:
        raise ValueError(f"{name}: an index exceeds the {spec.n_entries}-entry LUT")
    if not bool(torch.isfinite(pal.lut).all()):
        raise ValueError(f"{name}: LUT has NaN/Inf entries")
    if spec.per_channel_scale:
        if pal.scale is None or pal.scale.dtype != torch.float16 or tuple(pal.scale.shape) != (shape[0],):
            raise ValueError(f"{name}: per_channel_scale needs a float16 scale of shape ({shape[0]},)")
    elif pal.scale is not None:
        raise ValueError(f"{name}: has a scale but its spec says per_channel_scale=False")


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ValueError naming `name` for weights that cannot be palettized: the cheap checks
    (type, dtype, emptiness); finiteness is checked on the fp16 values by `fp16_weight`."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}: dtype {weight.dtype} is not a float type; palettization needs float weights "
            "(dequantize integer or bool weights first)"
        )
    if weight.numel() == 0 or weight.dim() == 0:
        raise ValueError(f"{name}: empty or scalar tensor of shape {tuple(weight.shape)}")


def fp16_weight(weight: torch.Tensor, name: str = "weight") -> np.ndarray:
    """The weight's fp16 values as numpy, checked: NaN/Inf, or values beyond fp16, raise."""
    check_weight(weight, name)
    w16 = weight.detach().to(torch.float16).cpu().numpy()
    if _exact1d.count_nonfinite(w16.reshape(-1).view(np.uint16)):
        bad = int((~torch.isfinite(weight.detach())).sum())
        if bad:
            raise ValueError(f"{name}: {bad} NaN/Inf value(s); fix the weights before palettizing")
        raise ValueError(
            f"{name}: values beyond the fp16 range (|w| > 65504) cannot be stored in a fp16 LUT"
        )
    return w16


def _check_importance(importance: torch.Tensor, weight: torch.Tensor, name: str) -> np.ndarray:
    if tuple(importance.shape) != tuple(weight.shape):
        raise ValueError(
            f"{name}: importance shape {tuple(importance.shape)} != weight shape {tuple(weight.shape)}"
        )
    imp = importance.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise ValueError(f"{name}: importance must be finite and >= 0")
    mean = imp.mean()
    # Normalised, with a floor so that every value still counts a little: a weight nobody's
    # gradient touched is still used by the model.
    return (imp / mean if mean > 0 else np.ones_like(imp)) + 1e-6


def _scaled_rows(w16: np.ndarray, per_channel_scale: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(out_channels, rest) fp16 rows, normalised per channel by max|w| as coremltools does."""
    rows = w16.reshape(w16.shape[0], -1)
    if not per_channel_scale:
        return rows, None
    scale = np.abs(rows).max(axis=1)
    scale[scale == 0] = 1
    return rows / scale[:, None], scale


@dataclass
class _Layout:
    """One weight under one (granularity, group_size, cluster_dim, per_channel_scale) layout."""

    item: int
    shape: tuple[int, ...]
    rows: np.ndarray  # (out_channels, rest) fp16, scaled when per_channel_scale
    scale: np.ndarray | None
    groups: int
    importance: np.ndarray | None
    members: list[int]  # indices into the item's specs


def _fit_scalar(layouts: list[_Layout], specs: list[list[PaletteSpec]], assign: bool = True) -> dict:
    """(lut, indices) per (item, spec index) for scalar layouts: the exact k-means of every group
    for every LUT size any of them asks for, every group of every layout in one parallel call
    (indices None without `assign`)."""
    keys = _exact1d.fp16_keys(np.concatenate([lo.rows.reshape(-1) for lo in layouts]).view(np.uint16))
    weighted = any(lo.importance is not None for lo in layouts)
    weights = np.empty(0)
    if weighted:
        weights = np.concatenate(
            [lo.importance.reshape(-1) if lo.importance is not None else np.ones(lo.rows.size)
             for lo in layouts]
        )
    seg_starts, first_seg, offset = [], [], 0
    for lo in layouts:
        first_seg.append(len(seg_starts))
        size = lo.rows.size // lo.groups
        seg_starts.extend(range(offset, offset + lo.rows.size, size))
        offset += lo.rows.size
    starts = np.array(seg_starts, dtype=np.int64)
    ends = np.append(starts[1:], offset)
    ks = np.array(sorted({specs[lo.item][i].n_entries for lo in layouts for i in lo.members}))
    _, centroids = _exact1d.fit_segments(keys, starts, ends, weights, ks, _exact1d.KEY_VALUES)
    out = {}
    for r, k in enumerate(ks):
        wanted = [(lo, f, i) for lo, f in zip(layouts, first_seg) for i in lo.members
                  if specs[lo.item][i].n_entries == k]
        segs = np.concatenate([np.arange(f, f + lo.groups) for lo, f, _ in wanted])
        luts16 = centroids[segs, r, :k].astype(np.float16)
        idx = None
        if assign:
            idx = _exact1d.assign_segments(
                keys, starts[segs], ends[segs], luts16.astype(np.float64), _exact1d.KEY_VALUES
            )
        at = 0
        for lo, f, i in wanted:
            a, b = starts[f], starts[f] + lo.rows.size
            out[lo.item, i] = (luts16[at : at + lo.groups, :, None], None if idx is None else idx[a:b])
            at += lo.groups
    return out


def _fit_vector(lo: _Layout, spec: PaletteSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Vector k-means with faiss per group; vectors are `cluster_dim` consecutive channels."""
    import faiss

    d, k, groups = spec.cluster_dim, spec.n_entries, lo.groups
    out_channels, positions = lo.rows.shape
    # (groups, rows_per_group/d, d, positions) -> vectors (groups, rows_per_group/d * positions, d)
    vecs = lo.rows.reshape(groups, -1, d, positions).transpose(0, 1, 3, 2).reshape(groups, -1, d)
    wts = None
    if lo.importance is not None:
        wts = lo.importance.reshape(groups, -1, d, positions).sum(axis=2).reshape(groups, -1)
    luts = np.empty((groups, k, d), dtype=np.float16)
    idx = np.empty(vecs.shape[:2], dtype=np.uint8)
    for g in range(groups):
        x = np.ascontiguousarray(vecs[g], dtype=np.float32)
        uniq = np.unique(x, axis=0)
        if len(uniq) <= k:
            cent = uniq
        else:
            km = faiss.Kmeans(d, k, niter=25, seed=seed + g, verbose=False)
            km.train(x, weights=None if wts is None else wts[g].astype(np.float32))
            cent = km.centroids
        cent16 = np.unique(cent.astype(np.float16), axis=0)  # canonical, sorted LUT order
        cent16 = np.concatenate([cent16, np.repeat(cent16[-1:], k - len(cent16), axis=0)])
        luts[g] = cent16
        idx[g] = _nearest_vectors(x, cent16)
    return luts, idx.reshape(out_channels // d, positions)


def _layouts(
    item: int, weight: torch.Tensor, specs: list[PaletteSpec], importance, name: str
) -> list[_Layout]:
    w16 = fp16_weight(weight, name)
    for s in specs:
        if not isinstance(s, PaletteSpec):
            raise ValueError(f"{name}: expected PaletteSpec, got {type(s).__name__}")
        s.n_groups(weight.shape[0], name)
    imp = _check_importance(importance, weight, name) if importance is not None else None
    by_layout: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(specs):
        by_layout[(s.granularity, s.group_size, s.cluster_dim, s.per_channel_scale)].append(i)
    out = []
    for (_, _, _, per_channel_scale), members in by_layout.items():
        rows, scale = _scaled_rows(w16, per_channel_scale)
        groups = specs[members[0]].n_groups(weight.shape[0], name)
        out.append(_Layout(item, tuple(weight.shape), rows, scale, groups, imp, members))
    return out


@deferred()  # Ctrl-C waits for the numba/faiss kernels, then is raised
def fit_palettes_batch(
    items: Sequence[tuple[torch.Tensor, Sequence[PaletteSpec], torch.Tensor | None]],
    *,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> list[list[Palette]]:
    """Palettes for several (weight, specs, importance) items at once.

    Every scalar spec of every item is fitted from one histogram per group, all groups of all
    items solved in parallel calls: the fast path for whole models. Every item is checked
    before anything is fitted.
    """
    names = list(names) if names is not None else [f"weight[{i}]" for i in range(len(items))]
    specs = [list(s) for _, s, _ in items]
    layouts = [
        lo
        for i, (w, s, imp) in enumerate(items)
        for lo in _layouts(i, w, specs[i], imp, names[i])
    ]
    fitted = {}
    # layouts grouped by the LUT sizes they ask for: no group is fitted for sizes it did not ask
    by_sizes: dict[tuple[int, ...], list[_Layout]] = defaultdict(list)
    for lo in layouts:
        if specs[lo.item][lo.members[0]].cluster_dim == 1:
            by_sizes[tuple(sorted({specs[lo.item][i].n_entries for i in lo.members}))].append(lo)
    for scalar in by_sizes.values():
        fitted.update(_fit_scalar(scalar, specs))
    for lo in layouts:
        if specs[lo.item][lo.members[0]].cluster_dim > 1:
            for i in lo.members:
                fitted[lo.item, i] = _fit_vector(lo, specs[lo.item][i], seed)
    result = []
    for lo_item, (w, s, _) in enumerate(items):
        pals = []
        for i, spec in enumerate(specs[lo_item]):
            lut, idx = fitted[lo_item, i]
            lo = next(x for x in layouts if x.item == lo_item and i in x.members)
            indices = torch.from_numpy(np.ascontiguousarray(idx)).reshape(
                w.shape[0] // spec.cluster_dim, *w.shape[1:]
            )
            scale = torch.from_numpy(lo.scale.astype(np.float16)) if lo.scale is not None else None
            pals.append(Palette(torch.from_numpy(np.ascontiguousarray(lut)), indices, spec, scale))
        result.append(pals)
    return result


@deferred()  # Ctrl-C waits for the numba/faiss kernels, then is raised
def fit_luts_batch(
    items: Sequence[tuple[torch.Tensor, Sequence[PaletteSpec]]], *, names: Sequence[str] | None = None
) -> list[list[np.ndarray]]:
    """The fp16 LUTs (groups, 2^nbits) of scalar, unscaled specs for several (weight, specs) items,
    without assigning any weight to an entry: every weight takes its nearest entry (ties to the
    lower one), so the LUT alone determines the palette (`fit_palettes_batch` gives the indices)."""
    names = list(names) if names is not None else [f"weight[{i}]" for i in range(len(items))]
    specs = [list(s) for _, s in items]
    for i, ss in enumerate(specs):
        bad = [s.label for s in ss if s.cluster_dim != 1 or s.per_channel_scale]
        if bad:
            raise ValueError(f"{names[i]}: fit_luts_batch takes scalar unscaled specs only, got {bad}")
    layouts = [lo for i, (w, s) in enumerate(items) for lo in _layouts(i, w, specs[i], None, names[i])]
    by_sizes: dict[tuple[int, ...], list[_Layout]] = defaultdict(list)
    for lo in layouts:
        by_sizes[tuple(sorted({specs[lo.item][i].n_entries for i in lo.members}))].append(lo)
    fitted = {}
    for group in by_sizes.values():
        fitted.update(_fit_scalar(group, specs, assign=False))
    return [[fitted[i, j][0][:, :, 0] for j in range(len(specs[i]))] for i in range(len(items))]


@deferred()  # Ctrl-C waits for the numba/faiss kernels, then is raised
def fit_palettes(
    weight: torch.Tensor,
    specs: Sequence[PaletteSpec],
    importance: torch.Tensor | None = None,
    *,
    seed: int = 0,
    name: str = "weight",
) -> list[Palette]:
    """Palettes of one weight for several specs, sharing work: scalar specs with the same layout
    share one histogram per group (2-entry LUTs from the layered DP, larger ones each from a
    Lagrangian search)."""
    return fit_palettes_batch([(weight, specs, importance)], seed=seed, names=[name])[0]


@deferred()  # Ctrl-C waits for the numba/faiss kernels, then is raised
def fit_palette(
    weight: torch.Tensor,
    spec: PaletteSpec,
    importance: torch.Tensor | None = None,
    *,
    seed: int = 0,
    name: str = "weight",
) -> Palette:
    """Palettize one weight: the optimal LUT under `spec` (weighted by `importance` if given)."""
    return fit_palettes(weight, [spec], importance, seed=seed, name=name)[0]


def _nearest_vectors(x: np.ndarray, cent16: np.ndarray) -> np.ndarray:
    """Index of the nearest fp16 centroid (squared distance) of every fp32 vector in `x`."""
    import faiss

    index = faiss.IndexFlatL2(cent16.shape[1])
    index.add(cent16.astype(np.float32))
    return index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0]


@deferred()  # Ctrl-C waits for the numba/faiss kernels, then is raised
def palette_from_lut(
    weight: torch.Tensor,
    spec: PaletteSpec,
    lut: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    name: str = "weight",
) -> Palette:
    """The palette of `weight` over a given fp16 LUT (groups, 2^nbits, cluster_dim): every value
    (vector) takes its nearest entry, ties to the lower index, as `fit_palettes` assigns.
    Reproduces a stored palette without the data that chose its LUT (an importance-weighted one,
    or one a model carries). `scale` (fp16, one per output channel) divides each channel first,
    exactly (a stored palette's scale); without it a `per_channel_scale` spec takes max|w| per
    channel, as fitting does. The LUT need not be sorted."""
    w16 = fp16_weight(weight, name)
    out_channels, d = weight.shape[0], spec.cluster_dim
    want = (spec.n_groups(out_channels, name), spec.n_entries, d)
    if tuple(lut.shape) != want or lut.dtype != torch.float16:
        raise ValueError(f"{name}: LUT must be float16 of shape {want}, got {lut.dtype} {tuple(lut.shape)}")
    if not bool(torch.isfinite(lut).all()):
        raise ValueError(f"{name}: LUT has NaN/Inf entries")
    if scale is None:
        rows, sc = _scaled_rows(w16, spec.per_channel_scale)
    else:
        if not spec.per_channel_scale:
            raise ValueError(f"{name}: a scale was given but the spec has per_channel_scale=False")
        sc = scale.detach().cpu().reshape(-1)
        if sc.dtype != torch.float16 or sc.numel() != out_channels or not bool((torch.isfinite(sc) & (sc != 0)).all()):
            raise ValueError(f"{name}: the scale must be {out_channels} finite, non-zero float16 values")
        sc = sc.numpy()
        exact = weight.detach().to(torch.float64).cpu().numpy().reshape(out_channels, -1)
        rows = (exact / sc.astype(np.float64)[:, None]).astype(np.float16)
    groups = want[0]
    luts = lut.numpy()
    if d == 1:
        order = np.argsort(luts[:, :, 0], axis=1, kind="stable")
        ordered = np.take_along_axis(luts[:, :, 0], order, axis=1).astype(np.float64)
        keys = _exact1d.fp16_keys(np.ascontiguousarray(rows).reshape(-1).view(np.uint16))
        size = rows.size // groups
        starts = np.arange(0, rows.size, size, dtype=np.int64)
        idx = _exact1d.assign_segments(keys, starts, starts + size, ordered, _exact1d.KEY_VALUES)
        idx = np.take_along_axis(order, idx.reshape(groups, -1).astype(np.int64), axis=1).astype(np.uint8)
        indices = torch.from_numpy(idx).reshape(weight.shape)
    else:
        positions = rows.shape[1]
        vecs = rows.reshape(groups, -1, d, positions).transpose(0, 1, 3, 2).reshape(groups, -1, d)
        idx = np.stack([_nearest_vectors(vecs[g], luts[g]) for g in range(groups)]).astype(np.uint8)
        indices = torch.from_numpy(idx).reshape(out_channels // d, *weight.shape[1:])
    out_scale = torch.from_numpy(sc.astype(np.float16)) if spec.per_channel_scale else None
    return Palette(lut.clone(), indices, spec, out_scale)


@deferred()  # Ctrl-C waits for the numba/faiss kernels, then is raised
def optimal_costs(
    weight: torch.Tensor, max_clusters: int = 256, importance: torch.Tensor | None = None
) -> np.ndarray:
    """Optimal per-tensor k-means cost (importance-weighted sum of squared errors) of `weight`'s
    fp16 values for k = 1..max_clusters, from a single DP pass (centroids not yet rounded)."""
    w16 = fp16_weight(weight).reshape(-1)
    keys = _exact1d.fp16_keys(w16.view(np.uint16))
    weights = np.empty(0)
    if importance is not None:
        imp = importance.detach().to(torch.float64).cpu().numpy()
        if imp.shape != tuple(weight.shape) or not np.isfinite(imp).all() or (imp <= 0).any():
            raise ValueError("importance must be finite, > 0 and shaped like the weight")
        weights = imp.reshape(-1)
    return _exact1d.every_cost(keys, weights, max_clusters, _exact1d.KEY_VALUES)
