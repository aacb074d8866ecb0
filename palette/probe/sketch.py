"""The sketch algebra of the fast probe: how a candidate palette's weight change meets the
per-sample gradients without storing them.

A scalar palette maps each weight by its fp16 value within its LUT group, so for a gradient g,
<g, dW> = sum_p H(p) (q(p) - u(p)) + <g, fp16(W) - W> over the distinct (group, value) pairs p of
the weight, H(p) the sum of g over the weights of pair p -- exact, whatever the LUT (`ValueIndex`).
`Streamed` folds every backward pass into <g, dW> for all of a layer's candidates at once (nothing
per gradient kept); `SketchFold` keeps the per-pair sums (or the gradients themselves) instead,
and `Scorer` scores any new weight against them later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..cluster import Palette
from ..spec import PaletteSpec

N_KEYS = 1 << 16  # fp16 bit patterns


@dataclass
class Sketch:
    """Per-layer gradient sketch: rows are (pass, sample) pairs, `sample` gives each row's sample.

    kind "values": `data` (rows, n_pairs) sums of the gradient over the weights of each distinct
    (group, fp16 value) pair of `values`, `resid` (rows,) = <g, fp16(W) - W>.
    kind "dense": `data` (rows, numel), the per-sample gradients themselves.
    """

    kind: str
    data: torch.Tensor
    sample: torch.Tensor
    values: "ValueIndex | None" = None
    resid: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # the layer's live weight, attached by keep_sketch
    checksum: float | None = None


def fp16_bits(w: torch.Tensor) -> torch.Tensor:
    """Raw fp16 bit patterns of a weight as int64 in [0, 65536), flattened (not the
    order-preserving keys of `_exact1d.fp16_keys`)."""
    return w.detach().to(torch.float16).reshape(-1).view(torch.int16).to(torch.int64) & 0xFFFF


def is_value_function(spec: PaletteSpec) -> bool:
    """Whether palettizing with `spec` maps each weight by its fp16 value within its group alone."""
    return spec.cluster_dim == 1 and not spec.per_channel_scale


def group_rows(spec: PaletteSpec) -> int | None:
    """Output channels per LUT group (None: one LUT for the whole tensor)."""
    return spec.group_size if spec.granularity == "per_grouped_channel" else None


def rep_positions(idx: torch.Tensor, n: int) -> torch.Tensor:
    """For each of `n` slots, the first position whose slot it is."""
    first = torch.full((n,), idx.numel(), dtype=torch.int64)
    return first.scatter_reduce_(0, idx, torch.arange(idx.numel()), reduce="amin")


class ValueIndex:
    """The distinct (group, fp16 value) pairs of a weight, a group being `rows` consecutive output
    channels (None: the whole tensor). A weight change that depends only on the value within its
    group -- any unscaled scalar palette -- acts on the output through the gradient's sums over
    these pairs: <g, dW> = sum_p H_p (q_p - u_p) + <g, fp16(W) - W>, exactly."""

    def __init__(self, w: torch.Tensor, rows: int | None) -> None:
        keys = fp16_bits(w)
        self.rows = rows
        if rows is None:  # a 65536-entry table maps keys to slots: nothing stored per element
            present = torch.zeros(N_KEYS, dtype=torch.bool)
            present[keys] = True
            self.values = present.nonzero().reshape(-1)
            self.table = torch.cumsum(present.to(torch.int64), 0) - 1
            self.slot = None
        else:
            parts, slots, offset = [], [], 0
            for gk in keys.view(w.shape[0] // rows, -1):
                present = torch.zeros(N_KEYS, dtype=torch.bool)
                present[gk] = True
                parts.append(present.nonzero().reshape(-1))
                slots.append((torch.cumsum(present.to(torch.int32), 0) - 1 + offset)[gk])
                offset += len(parts[-1])
            self.values = torch.cat(parts)
            self.slot = torch.cat(slots)
        self.n = len(self.values)
        self.u = self.values.to(torch.int16).view(torch.float16).double()

    def slots(self, w: torch.Tensor) -> torch.Tensor:
        """(numel,) int64 slot of every element of the (unchanged) weight `w`."""
        return self.table[fp16_bits(w)] if self.slot is None else self.slot.long()

    def fold(self, w: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients `gs` (b, numel) -> their per-pair sums (b, n)."""
        idx = self.slots(w.detach().reshape(-1))
        return torch.stack([torch.bincount(idx, weights=gs[s], minlength=self.n) for s in range(gs.shape[0])])

    def positions(self, w: torch.Tensor) -> torch.Tensor:
        """(n,) the first flat position of every pair in the (unchanged) weight `w`."""
        return rep_positions(self.slots(w), self.n)

    def change(self, new: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """q_p - u_p (n,) float64 for a new weight that is a function of the pair; else ValueError."""
        idx = self.slots(w)
        new = new.detach().reshape(-1)
        if new.numel() != idx.numel():
            raise ValueError(f"new weight has {new.numel()} elements, the layer {idx.numel()}")
        q = new[rep_positions(idx, self.n)].double()
        if not torch.equal(new.double(), q[idx]):
            raise ValueError(
                "this layer's sketch holds per-value gradient sums: the new weight must be a function of "
                "the old weight's fp16 value within its group (an unscaled scalar palette); include "
                "such a spec in the probe's `specs` to keep dense gradients"
            )
        return q - self.u


class Scorer:
    """Scores new weights of one layer against its sketch: per-sample sum of squared output error
    (not yet divided by the sample size). Per-layer work is done once, not once per palette."""

    def __init__(self, sk: Sketch, weight: torch.Tensor, n_probes: int, n_samples: int) -> None:
        self.sk, self.n_probes, self.n_samples = sk, n_probes, n_samples
        self.weight = weight.detach().reshape(-1)
        if sk.kind == "values":
            self.data = sk.data.double()

    def __call__(self, new: Palette | torch.Tensor) -> np.ndarray:
        sk = self.sk
        w_new = (new.dequantize() if isinstance(new, Palette) else new.detach()).reshape(-1)
        if sk.kind == "dense":
            if w_new.numel() != self.weight.numel():
                raise ValueError(f"new weight has {w_new.numel()} elements, the layer {self.weight.numel()}")
            return fold_probes(sk.data @ (w_new.float() - self.weight.float()), sk.sample, self.n_probes, self.n_samples)
        z = self.data @ sk.values.change(w_new, self.weight) + sk.resid
        return fold_probes(z, sk.sample, self.n_probes, self.n_samples)


def fp16_residual(w: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """(b,) <g_s, fp16(W) - W>: the part of every scalar palette's weight change that comes from
    rounding the weight to fp16 before clustering (zero for fp16 weights)."""
    w = w.detach().reshape(-1)
    return (gs @ (w.to(torch.float16).float() - w.float())).double()


def fold_probes(z: torch.Tensor, sample: torch.Tensor, n_probes: int, n_samples: int) -> np.ndarray:
    """Mean of z^2 over the passes of each sample (Hutchinson estimate of ||J dW||^2); `z` is
    (rows,) or (rows, columns), `sample` the sample of each row."""
    z = z.double() ** 2
    out = torch.zeros((n_samples,) + z.shape[1:], dtype=torch.float64).index_add_(0, sample, z)
    return (out / n_probes).numpy()


def values_at(p: Palette, pos: torch.Tensor) -> torch.Tensor:
    """The dequantized values of an unscaled scalar palette at flat positions `pos` (without
    dequantizing the whole weight)."""
    row = pos // p.indices[0].numel()
    group = row // (p.indices.shape[0] // p.lut.shape[0])
    return p.lut[group, p.indices.reshape(-1)[pos].long(), 0]


class Streamed:
    """A layer's candidate palettes, kept compact for the passes: each backward pass folds the
    per-sample gradients into <g, dW> for every candidate at once (no gradient is stored).
    Scalar palettes act through per-pair gradient sums (`ValueIndex`), others through their
    dequantized weight, rebuilt on the fly."""

    def __init__(self, w: torch.Tensor, palettes: list[Palette]) -> None:
        self.n = len(palettes)
        # per grouping: its pair index, the columns it serves and their (n_pairs, columns) q - u
        self.scalar: list[tuple[ValueIndex, list[int], torch.Tensor]] = []
        self.other: list[tuple[int, Palette]] = []
        by_rows: dict[int | None, list[int]] = {}
        for i, p in enumerate(palettes):
            if is_value_function(p.spec):
                by_rows.setdefault(group_rows(p.spec), []).append(i)
            else:
                self.other.append((i, p))
        for rows, cols in by_rows.items():
            index = ValueIndex(w, rows)
            pos = index.positions(w)
            change = torch.stack([values_at(palettes[i], pos).double() - index.u for i in cols], 1)
            self.scalar.append((index, cols, change))

    def __call__(self, w: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor]:
        """(b, candidates) float64: <g_s, dW> for every sample and candidate."""
        out = torch.empty(gs.shape[0], self.n, dtype=torch.float64)
        resid = fp16_residual(w, gs)[:, None] if self.scalar else None
        for index, cols, change in self.scalar:
            out[:, cols] = index.fold(w, gs).double() @ change + resid
        wf = w.detach().reshape(-1).float()
        for i, p in self.other:
            out[:, i] = (gs @ (p.dequantize().reshape(-1).float() - wf)).double()
        return (out,)

    def zeros(self, b: int) -> tuple[torch.Tensor]:
        return (torch.zeros(b, self.n, dtype=torch.float64),)


class SketchFold:
    """Keeps a layer's gradients for later scoring (`keep_sketch`): per-pair sums when `index` is
    given (all its specs are scalar palettes on one grouping), else the gradients themselves."""

    def __init__(self, index: ValueIndex | None, numel: int) -> None:
        self.index, self.numel = index, numel

    def __call__(self, w: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.index.fold(w, gs), fp16_residual(w, gs)) if self.index is not None else (gs,)

    def zeros(self, b: int) -> tuple[torch.Tensor, ...]:
        if self.index is None:
            return (torch.zeros(b, self.numel),)
        return torch.zeros(b, self.index.n), torch.zeros(b, dtype=torch.float64)

    def sketch(self, blocks: tuple[torch.Tensor, ...], sample: torch.Tensor) -> Sketch:
        if self.index is None:
            return Sketch("dense", blocks[0], sample)
        return Sketch("values", blocks[0], sample, self.index, blocks[1])
