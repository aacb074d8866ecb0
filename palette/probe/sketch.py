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

from .. import metadata
from .._exact1d import KEY_VALUES
from ..cluster import Palette
from ..spec import PaletteSpec
from ._binsum import MIN_TASKS, bin_sums, combine_dense, group_folds

N_KEYS = 1 << 16  # fp16 bit patterns
COMPILED_DEVICES = ("cpu",)  # where the folds run the compiled pass (`_binsum`); torch ops elsewhere


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
    these pairs: <g, dW> = sum_p H_p (q_p - u_p) + <g, fp16(W) - W>, exactly. Kept on the CPU,
    whatever the weight's device (`keep_sketch` keeps the sums there)."""

    def __init__(self, w: torch.Tensor, rows: int | None) -> None:
        keys = fp16_bits(w.detach().cpu())
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
        return self.table[fp16_bits(w.detach().cpu())] if self.slot is None else self.slot.long()

    def fold(self, w: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients `gs` (b, numel) -> their per-pair sums (b, n), on the CPU."""
        idx = self.slots(w.detach().reshape(-1))
        gs = gs.cpu()
        return torch.stack([torch.bincount(idx, weights=gs[s], minlength=self.n) for s in range(gs.shape[0])])

    def change(self, new: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """q_p - u_p (n,) float64 for a new weight that is a function of the pair; else ValueError."""
        idx = self.slots(w)
        new = new.detach().reshape(-1).cpu()
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
        self.weight = weight.detach().reshape(-1).cpu()
        if sk.kind == "values":
            self.data = sk.data.double()

    def __call__(self, new: Palette | torch.Tensor) -> np.ndarray:
        sk = self.sk
        w_new = (new.dequantize() if isinstance(new, Palette) else new.detach()).reshape(-1).cpu()
        if sk.kind == "dense":
            if w_new.numel() != self.weight.numel():
                raise ValueError(f"new weight has {w_new.numel()} elements, the layer {self.weight.numel()}")
            return fold_probes(sk.data @ (w_new.float() - self.weight.float()), sk.sample, self.n_probes, self.n_samples)
        z = self.data @ sk.values.change(w_new, self.weight) + sk.resid
        return fold_probes(z, sk.sample, self.n_probes, self.n_samples)


def fp16_residual(w: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """(b,) <g_s, fp16(W) - W>: the part of every scalar palette's weight change that comes from
    rounding the weight to fp16 before clustering (zero for fp16 weights)."""
    w = w.detach().reshape(-1).double()
    return gs.double() @ (w.to(torch.float16).double() - w)


def fold_probes(z: torch.Tensor, sample: torch.Tensor, n_probes: int, n_samples: int) -> np.ndarray:
    """Mean of z^2 over the passes of each sample (Hutchinson estimate of ||J dW||^2); `z` is
    (rows,) or (rows, columns), `sample` the sample of each row."""
    z = z.double() ** 2
    out = torch.zeros((n_samples,) + z.shape[1:], dtype=torch.float64).index_add_(0, sample, z)
    return (out / n_probes).numpy()


def fp16_order_keys(w: torch.Tensor) -> torch.Tensor:
    """Order-preserving keys (int64 in [0, 65536)) of a weight's fp16 values, flattened, on its
    device: the keys `_exact1d.fp16_keys` computes (-0 is +0), so key order is value order."""
    return _order_keys(w.detach().to(torch.float16).reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF)


def _order_keys(bits: torch.Tensor) -> torch.Tensor:
    """Order-preserving keys of fp16 bit patterns given as int32 in [0, 65536)."""
    bits = torch.where(bits == 0x8000, torch.zeros_like(bits), bits)
    return torch.where((bits & 0x8000) == 0, bits | 0x8000, ~bits & 0xFFFF).to(torch.int64)


class LayerValues:
    """The distinct fp16 values of a layer's weight in ascending order (their ranks), and the rank
    of every element, looked up from its fp16 bit pattern when asked: nothing is stored per
    element, only a table over the 65536 patterns."""

    def __init__(self, w: torch.Tensor) -> None:
        present = torch.zeros(N_KEYS, dtype=torch.bool, device=w.device)
        present[fp16_order_keys(w)] = True
        rank = torch.cumsum(present.to(torch.int64), 0) - 1  # order key -> rank, where present
        keys = present.nonzero().reshape(-1)
        self.values = torch.from_numpy(KEY_VALUES).to(w.device)[keys]  # (D,) float64, ascending
        self.n = len(keys)
        self.by_bits = rank[_order_keys(torch.arange(N_KEYS, dtype=torch.int32, device=w.device))]  # bits -> rank

    def ranks(self, w: torch.Tensor) -> torch.Tensor:
        """(numel,) int64 rank of every element's fp16 value, in memory order."""
        bits = w.detach().to(torch.float16).reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
        return self.by_bits.index_select(0, bits)

    def bins(self, ranks: torch.Tensor, rows: int | None, out_channels: int) -> torch.Tensor:
        """(numel,) bin of every element: group * D + rank, groups of `rows` output channels."""
        if rows is None:
            return ranks
        groups = out_channels // rows
        offsets = torch.arange(groups, device=ranks.device) * self.n
        return (ranks.view(groups, -1) + offsets[:, None]).view(-1)


class Thresholds:
    """Unscaled scalar palettes of one grouping as thresholds on the layer's value ranks. A weight
    takes its nearest LUT entry (ties to the lower one), so within a group the cluster of LUT entry
    j is a run of ranks [bounds[g, j], bounds[g, j + 1]): for per-sample gradients summed per
    (group, rank) bin, H, the palette's <g, dW> is sum_j lut_j S_j - U_j (S, U the sums of H and
    of H x value over the run) plus <g, fp16(W) - W>. Per group and LUT entry one bound and one
    value: nothing per element or per distinct value."""

    def __init__(self, values: LayerValues, rows: int | None, luts: list[np.ndarray], device: torch.device) -> None:
        self.rows = rows
        self.groups = luts[0].shape[0]
        bounds, weights, owner = [], [], []
        for c, lut in enumerate(luts):  # (groups, k) fp16, ascending
            lut64 = torch.from_numpy(lut.astype(np.float64)).to(device)
            mid = (lut64[:, :-1] + lut64[:, 1:]) / 2  # exact: fp16 values are exact in float64
            inner = torch.searchsorted(values.values, mid, right=True)  # values <= mid go below
            edge = torch.zeros((self.groups, 1), dtype=torch.int64, device=device)
            bounds.append(torch.cat([edge, inner, edge + values.n], 1))
            weights.append(torch.cat([lut64, torch.zeros_like(lut64[:, :1])], 1))
            owner += [c] * lut.shape[1] + [-1]
        # every candidate's bounds side by side: position j's run is [index[:, j], index[:, j + 1]),
        # a run of candidate owner[j], or the seam between two candidates (owner -1: not counted)
        self.index = torch.cat(bounds, 1)
        self.lut = torch.cat(weights, 1)[:, :-1].contiguous()
        self.owner = np.array(owner[:-1], dtype=np.int64)
        self.n_candidates = len(luts)
        self.member = (torch.from_numpy(self.owner).to(device)[:, None] == torch.arange(len(luts), device=device)).double()
        if self.index.device.type == "cpu":  # numpy views for the compiled folds
            self._index_np, self._lut_np = self.index.numpy(), self.lut.numpy()

    def __call__(self, values: LayerValues, hist: torch.Tensor) -> torch.Tensor:
        """(rows, candidates) float64 sum_j lut_j S_j - U_j for gradient rows summed per (group,
        rank) bin, `hist` (rows, groups, D) float64."""
        b = hist.shape[0]
        sums = torch.zeros(2, b, self.groups, values.n + 1, dtype=torch.float64, device=hist.device)
        sums[0, ..., 1:] = hist
        torch.mul(hist, values.values, out=sums[1, ..., 1:])
        sums.cumsum_(3)  # runs of ranks [a, b) sum to s[b] - s[a]
        s, u = sums.gather(3, self.index.expand(2, b, -1, -1)).diff(dim=3)
        return (self.lut * s - u).sum(1) @ self.member

    def dense(self, values: LayerValues, hist: torch.Tensor) -> torch.Tensor:
        """`self(values, hist)` computed by compiled code (CPU tensors)."""
        return combine_dense(hist, values.values, self._index_np, self._lut_np, self.owner, self.n_candidates)

    def folded(self, values: LayerValues, w: torch.Tensor, gs: torch.Tensor, whole: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """On the CPU, straight from the per-sample gradients `gs` of weight `w`: (rows,
        candidates), (rows,) <g_s, fp16(W) - W> and, if `whole`, the gradients summed per rank over
        all groups (rows, 1, D) -- what a one-group grouping needs -- from the same walk. Many
        groups: each group's sums in a scratch of its own, taken to its terms at once
        (`_binsum.group_folds`); few: the dense sums."""
        if self.groups < MIN_TASKS:
            hist, resid = bin_sums(w, gs, values.by_bits, values.n, self.groups)
            return self.dense(values, hist), resid, hist.sum(1, keepdim=True) if whole else None
        return group_folds(w, gs, values.by_bits, values.values, self._index_np, self._lut_np, self.owner,
                           self.n_candidates, whole)


class Streamed:
    """A layer's candidate palettes, kept compact for the passes: each backward pass folds the
    per-sample gradients into <g, dW> for every candidate at once (no gradient is stored).
    Unscaled scalar palettes need only their LUTs (`Thresholds`, per grouping); others (scaled,
    vector) keep their palette and act through their weight, rebuilt on the fly."""

    def __init__(self, w: torch.Tensor, specs: list[PaletteSpec], luts: dict[int, np.ndarray],
                 others: dict[int, Palette]) -> None:
        self.n = len(specs)
        self.values = LayerValues(w) if luts else None
        by_rows: dict[int | None, list[int]] = {}
        for i in luts:
            by_rows.setdefault(group_rows(specs[i]), []).append(i)
        # finest grouping first: a coarser one sums its histogram when that is cheaper than a bincount
        self.scalar = sorted(((cols, Thresholds(self.values, rows, [luts[i] for i in cols], w.device))
                              for rows, cols in by_rows.items()), key=lambda c: -c[1].groups)
        self.other = sorted(others.items())

    def _hists(self, w: torch.Tensor, gs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per grouping of `scalar`, the gradients summed per (group, rank) bin, (b, groups, D)
        float64, with torch ops on the weight's device (a coarser grouping that the finest divides
        sums the finest's bins); and (b,) <g_s, fp16(W) - W>."""
        finest = self.scalar[0][1].groups
        d = self.values.n
        hists: list[torch.Tensor] = []
        g64 = gs.double()  # once for every grouping and the residual
        ranks = self.values.ranks(w)
        for _, th in self.scalar:
            if hists and finest % th.groups == 0 and finest * d < w.numel():
                hists.append(hists[0].view(gs.shape[0], th.groups, -1, d).sum(2))
                continue
            width = th.groups * d
            bins = self.values.bins(ranks, th.rows, w.shape[0]) + torch.arange(len(g64), device=gs.device)[:, None] * width
            hists.append(torch.bincount(bins.reshape(-1), weights=g64.reshape(-1), minlength=len(g64) * width)
                         .view(len(g64), th.groups, d))
        return hists, fp16_residual(w, g64)

    def __call__(self, w: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor]:
        """(b, candidates) float64: <g_s, dW> for every sample and candidate. On the CPU one
        compiled pass over the weight serves the finest grouping and the one-group grouping
        (`Thresholds.folded`), another any other grouping; elsewhere torch ops."""
        out = torch.empty(gs.shape[0], self.n, dtype=torch.float64, device=gs.device)
        if self.scalar and gs.device.type in COMPILED_DEVICES:
            (cols, finest), rest = self.scalar[0], self.scalar[1:]
            vals, resid, total = finest.folded(self.values, w, gs, whole=any(th.groups == 1 for _, th in rest))
            out[:, cols] = vals + resid[:, None]
            for cols, th in rest:  # the one-group grouping from the finest's walk; others walk again
                vals = th.dense(self.values, total) if th.groups == 1 else th.folded(self.values, w, gs)[0]
                out[:, cols] = vals + resid[:, None]
        elif self.scalar:
            hists, resid = self._hists(w, gs)
            for (cols, th), hist in zip(self.scalar, hists):
                out[:, cols] = th(self.values, hist) + resid[:, None]
        wf = w.detach().reshape(-1).float()
        for i, p in self.other:
            dw = metadata.exact_weight(p).reshape(-1).to(wf.device) - wf
            out[:, i] = (gs @ dw).double()
        return (out,)

    def zeros(self, b: int) -> tuple[torch.Tensor]:
        return (torch.zeros(b, self.n, dtype=torch.float64),)

    @property
    def nbytes(self) -> int:
        """Bytes this layer's candidates hold during the passes."""
        compact = sum(t.nbytes for _, th in self.scalar for t in (th.index, th.lut, th.member, th.owner))
        table = 0 if self.values is None else self.values.by_bits.nbytes + self.values.values.nbytes
        return compact + table + sum(p.indices.nbytes + p.lut.nbytes for _, p in self.other)


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
