"""Per-layer sensitivity: the output error of palettizing each target layer at each candidate spec.

Two estimators, on the same probe set (`palette.probe_inputs`), against the unmodified model run in
its own dtype (the "16-bit model" of Apple's MBP; fp32 on CPU):

- `exhaustive` (Apple MBP style): palettize one layer at one spec, run the probe set, measure the
  per-sample MSE, restore that layer. 1 + layers x specs forward passes.
- `fast` (first order, randomized): the output error of a weight change dW_l is e = J_l dW_l, and
  ||J_l dW_l||^2 = E_v[(v^T J_l dW_l)^2] = E_v[<g_l(v), dW_l>^2] for Rademacher v in output space,
  g_l(v) = d(v^T f)/dW_l. One forward and K backward passes (v differs per sample and pass) give,
  through hooks on every target layer, *per-sample* weight gradients (from each layer's input and
  output gradient: the batch never mixes samples), folded at once into inner products with every
  candidate dW_l. By default every candidate palette is fitted first (`fit_palettes_batch`, chunks
  of layers in parallel) and kept compact: a scalar palette maps each weight by its fp16 value
  within its LUT group, so <g, dW> = sum_p H(p) (q(p) - u(p)) + <g, fp16(W) - W> over the distinct
  (group, value) pairs p, H(p) the sum of g over the weights of pair p -- exact, whatever the LUT;
  vector or scaled palettes are dequantized on the fly. No gradient is stored, so memory is the
  model, its activations and the compact candidates. Cost: 1 + 2K forward-equivalents plus
  clustering, independent of layers x specs. With `keep_sketch=True` the gradients are kept
  instead (as per-pair sums, or whole), the candidates scored after the passes, and
  `Sensitivity.estimate` scores any other palette later -- e.g. one fitted with the Fisher
  (Gauss-Newton diagonal) importance that the squared gradients give on the side.

A mapping's error is predicted additively (per sample: sum of layer errors, then Apple's PSNR per
sample, averaged).

The model is never copied: the fast probe only reads weights; the exhaustive one writes one layer at
a time and restores it in a `finally`. Module training flags, `requires_grad` flags and `.grad`
are restored exactly, also on an exception or KeyboardInterrupt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._jsonio import read_json, write_atomic
from .cluster import Palette, fit_palettes, fit_palettes_batch
from .metrics import psnr_from_mse
from .palettize import DEFAULT_MIN_NUMEL, keep_original, target_layers
from .probe_inputs import ProbeSet, make_probe_set
from .spec import NBITS, PaletteSpec

FORMAT = "palette.sensitivity"
VERSION = 1
N_KEYS = 1 << 16  # fp16 bit patterns
METHODS = ("fast", "exhaustive")


@dataclass(frozen=True)
class LayerInfo:
    shape: tuple[int, ...]
    numel: int


@dataclass
class Cost:
    """Probe cost. One forward-equivalent = one forward pass over the whole probe set; a backward
    pass counts as two. Seconds are wall-clock and not saved (so equal seeds give equal files)."""

    forward_equivalents: float
    forwards: int
    backwards: int
    seconds: float = 0.0
    cluster_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"forward_equivalents": self.forward_equivalents, "forwards": self.forwards, "backwards": self.backwards}


@dataclass
class _Sketch:
    """Per-layer gradient sketch: rows are (pass, sample) pairs, `sample` gives each row's sample.

    kind "values": `data` (rows, n_pairs) sums of the gradient over the weights of each distinct
    (group, fp16 value) pair of `values`, `resid` (rows,) = <g, fp16(W) - W>.
    kind "dense": `data` (rows, numel), the per-sample gradients themselves.
    """

    kind: str
    data: torch.Tensor
    sample: torch.Tensor
    values: "_ValueIndex | None" = None
    resid: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # the layer's live weight, attached by keep_sketch
    checksum: float | None = None


@dataclass
class Sensitivity:
    """Per-layer, per-spec, per-sample output MSE of palettizing one layer, with sizes and costs."""

    layers: dict[str, LayerInfo]
    specs: list[PaletteSpec]
    errors: dict[str, np.ndarray]  # (len(specs), n_samples) per-sample MSE; NaN: spec not applicable
    nbytes: dict[str, list[int | None]]
    peak: np.ndarray  # (n_samples,) max|reference output| per sample
    sample_size: np.ndarray  # (n_samples,) output elements per sample
    method: str
    inputs_description: str
    seed: int
    n_probes: int
    cost: Cost
    importance: dict[str, torch.Tensor] | None = None
    sketch: dict[str, _Sketch] | None = field(default=None, repr=False)

    # -- queries ------------------------------------------------------------------------------
    def _spec_index(self, spec: PaletteSpec) -> int:
        try:
            return self.specs.index(spec)
        except ValueError:
            raise ValueError(f"spec {spec.label!r} was not probed; probed: {[s.label for s in self.specs]}") from None

    def _layer(self, name: str) -> str:
        if name not in self.layers:
            raise ValueError(f"{name!r} is not a probed layer ({len(self.layers)} probed)")
        return name

    def errors_per_sample(self, name: str, spec: PaletteSpec) -> np.ndarray:
        """Predicted (fast) or measured (exhaustive) MSE per probe sample."""
        e = self.errors[self._layer(name)][self._spec_index(spec)]
        if np.isnan(e).any():
            raise ValueError(f"{name}: spec {spec.label!r} does not apply to shape {self.layers[name].shape}")
        return e

    def error(self, name: str, spec: PaletteSpec) -> float:
        """Output MSE (over all probe outputs) of palettizing layer `name` alone with `spec`."""
        return float(np.average(self.errors_per_sample(name, spec), weights=self.sample_size))

    def nbytes_of(self, name: str, spec: PaletteSpec) -> int:
        n = self.nbytes[self._layer(name)][self._spec_index(spec)]
        if n is None:
            raise ValueError(f"{name}: spec {spec.label!r} does not apply to shape {self.layers[name].shape}")
        return n

    def _mapping_mse(self, mapping: Mapping[str, PaletteSpec | None]) -> np.ndarray:
        total = np.zeros(len(self.peak))
        for name, spec in mapping.items():
            if spec is not None:
                total += self.errors_per_sample(name, spec)
        return total

    def predict_mse(self, mapping: Mapping[str, PaletteSpec | None]) -> float:
        """Additive prediction of the output MSE of palettizing every layer of `mapping` at once."""
        return float(np.average(self._mapping_mse(mapping), weights=self.sample_size))

    def predict_psnr(self, mapping: Mapping[str, PaletteSpec | None]) -> float:
        """Additive prediction of Apple's latent PSNR (dB): per-sample sum of layer errors, per-sample
        PSNR, averaged over samples."""
        return float(psnr_from_mse(self._mapping_mse(mapping), self.peak).mean())

    def uniform(self, spec: PaletteSpec) -> dict[str, PaletteSpec]:
        """{layer: spec} for every probed layer that `spec` applies to."""
        i = self._spec_index(spec)
        return {n: spec for n in self.layers if self.nbytes[n][i] is not None}

    def estimate(self, name: str, new: Palette | torch.Tensor, per_sample: bool = False) -> float | np.ndarray:
        """Predicted output MSE of replacing layer `name`'s weight by `new` (a Palette, or the new
        weight itself), from the kept gradient sketch (`probe_sensitivity(..., keep_sketch=True)`).

        A "values" sketch (every probed spec a scalar palette on one grouping) scores any new weight
        that is a function of the old weight's value within its group, e.g. any unscaled scalar
        palette of that grouping, importance-weighted or not."""
        if self.sketch is None or name not in self.sketch:
            raise ValueError("estimate() needs the gradient sketch: probe with method='fast', keep_sketch=True")
        sk = self.sketch[name]
        if float(sk.weight.detach().double().sum()) != sk.checksum:
            raise ValueError(f"{name}: the layer's weight changed since probing; its sketch no longer applies")
        e = _Scorer(sk, sk.weight, self.n_probes, len(self.peak))(new) / self.sample_size
        return e if per_sample else float(np.average(e, weights=self.sample_size))

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "seed": self.seed,
            "n_probes": self.n_probes,
            "inputs_description": self.inputs_description,
            "specs": [s.to_dict() for s in self.specs],
            "samples": {"peak": [float(p) for p in self.peak], "size": [int(s) for s in self.sample_size]},
            "cost": self.cost.to_dict(),
            "layers": [
                {
                    "name": n,
                    "shape": list(info.shape),
                    "numel": info.numel,
                    "nbytes": self.nbytes[n],
                    "errors": [[num(x) for x in row] for row in self.errors[n].tolist()],
                }
                for n, info in self.layers.items()
            ],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON with deterministic bytes (sorted keys, shortest round-trip floats)."""
        write_atomic(Path(path), json.dumps(self.to_dict(), sort_keys=True, indent=1, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, d: Any, where: str = "sensitivity") -> "Sensitivity":
        try:
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} document")
            if d.get("version") != VERSION:
                raise ValueError(f"unsupported version {d.get('version')!r} (expected {VERSION})")
            specs = [PaletteSpec.from_dict(s) for s in d["specs"]]
            peak = np.asarray(d["samples"]["peak"], dtype=np.float64)
            size = np.asarray(d["samples"]["size"], dtype=np.int64)
            if peak.ndim != 1 or peak.shape != size.shape or len(peak) == 0:
                raise ValueError("samples.peak and samples.size must be equal-length non-empty lists")
            layers, errors, nbytes = {}, {}, {}
            for rec in d["layers"]:
                name = str(rec["name"])
                shape = tuple(int(s) for s in rec["shape"])
                layers[name] = LayerInfo(shape, int(rec["numel"]))
                err = np.array([[np.nan if x is None else x for x in row] for row in rec["errors"]], dtype=np.float64)
                if err.shape != (len(specs), len(peak)):
                    raise ValueError(f"layer {name}: errors shape {err.shape} != ({len(specs)}, {len(peak)})")
                if len(rec["nbytes"]) != len(specs):
                    raise ValueError(f"layer {name}: {len(rec['nbytes'])} nbytes for {len(specs)} specs")
                errors[name] = err
                nbytes[name] = [None if b is None else int(b) for b in rec["nbytes"]]
            c = d["cost"]
            cost = Cost(float(c["forward_equivalents"]), int(c["forwards"]), int(c["backwards"]))
            method = d["method"]
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}")
            return cls(layers, specs, errors, nbytes, peak, size, method, str(d["inputs_description"]),
                       int(d["seed"]), int(d["n_probes"]), cost)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid sensitivity data: {type(e).__name__}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Sensitivity":
        return cls.from_dict(read_json(path, "sensitivity"), str(path))


# ---------------------------------------------------------------------------------------------
# Scoring a weight change against a sketch


def _fp16_keys(w: torch.Tensor) -> torch.Tensor:
    """fp16 bit patterns of a weight as int64 in [0, 65536), flattened."""
    return w.detach().to(torch.float16).reshape(-1).view(torch.int16).to(torch.int64) & 0xFFFF


def _is_value_function(spec: PaletteSpec) -> bool:
    """Whether palettizing with `spec` maps each weight by its fp16 value within its group alone."""
    return spec.cluster_dim == 1 and not spec.per_channel_scale


def _group_rows(spec: PaletteSpec) -> int | None:
    """Output channels per LUT group (None: one LUT for the whole tensor)."""
    return spec.group_size if spec.granularity == "per_grouped_channel" else None


def _rep_positions(idx: torch.Tensor, n: int) -> torch.Tensor:
    """For each of `n` slots, the first position whose slot it is."""
    first = torch.full((n,), idx.numel(), dtype=torch.int64)
    return first.scatter_reduce_(0, idx, torch.arange(idx.numel()), reduce="amin")


class _ValueIndex:
    """The distinct (group, fp16 value) pairs of a weight, a group being `rows` consecutive output
    channels (None: the whole tensor). A weight change that depends only on the value within its
    group -- any unscaled scalar palette -- acts on the output through the gradient's sums over
    these pairs: <g, dW> = sum_p H_p (q_p - u_p) + <g, fp16(W) - W>, exactly."""

    def __init__(self, w: torch.Tensor, rows: int | None) -> None:
        keys = _fp16_keys(w)
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
        return self.table[_fp16_keys(w)] if self.slot is None else self.slot.long()

    def fold(self, w: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients `gs` (b, numel) -> their per-pair sums (b, n)."""
        idx = self.slots(w.detach().reshape(-1))
        return torch.stack([torch.bincount(idx, weights=gs[s], minlength=self.n) for s in range(gs.shape[0])])

    def positions(self, w: torch.Tensor) -> torch.Tensor:
        """(n,) the first flat position of every pair in the (unchanged) weight `w`."""
        return _rep_positions(self.slots(w), self.n)

    def change(self, new: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """q_p - u_p (n,) float64 for a new weight that is a function of the pair; else ValueError."""
        idx = self.slots(w)
        new = new.detach().reshape(-1)
        if new.numel() != idx.numel():
            raise ValueError(f"new weight has {new.numel()} elements, the layer {idx.numel()}")
        q = new[_rep_positions(idx, self.n)].double()
        if not torch.equal(new.double(), q[idx]):
            raise ValueError(
                "this layer's sketch holds per-value gradient sums: the new weight must be a function of "
                "the old weight's fp16 value within its group (an unscaled scalar palette); include "
                "such a spec in the probe's `specs` to keep dense gradients"
            )
        return q - self.u


class _Scorer:
    """Scores new weights of one layer against its sketch: per-sample sum of squared output error
    (not yet divided by the sample size). Per-layer work is done once, not once per palette."""

    def __init__(self, sk: _Sketch, weight: torch.Tensor, n_probes: int, n_samples: int) -> None:
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
            return _fold_probes(sk.data @ (w_new.float() - self.weight.float()), sk.sample, self.n_probes, self.n_samples)
        z = self.data @ sk.values.change(w_new, self.weight) + sk.resid
        return _fold_probes(z, sk.sample, self.n_probes, self.n_samples)


def _fp16_residual(w: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """(b,) <g_s, fp16(W) - W>: the part of every scalar palette's weight change that comes from
    rounding the weight to fp16 before clustering (zero for fp16 weights)."""
    w = w.detach().reshape(-1)
    return (gs @ (w.to(torch.float16).float() - w.float())).double()


def _fold_probes(z: torch.Tensor, sample: torch.Tensor, n_probes: int, n_samples: int) -> np.ndarray:
    """Mean of z^2 over the passes of each sample (Hutchinson estimate of ||J dW||^2); `z` is
    (rows,) or (rows, columns), `sample` the sample of each row."""
    z = z.double() ** 2
    out = torch.zeros((n_samples,) + z.shape[1:], dtype=torch.float64).index_add_(0, sample, z)
    return (out / n_probes).numpy()


def _values_at(p: Palette, pos: torch.Tensor) -> torch.Tensor:
    """The dequantized values of an unscaled scalar palette at flat positions `pos` (without
    dequantizing the whole weight)."""
    row = pos // p.indices[0].numel()
    group = row // (p.indices.shape[0] // p.lut.shape[0])
    return p.lut[group, p.indices.reshape(-1)[pos].long(), 0]


class _Streamed:
    """A layer's candidate palettes, kept compact for the passes: each backward pass folds the
    per-sample gradients into <g, dW> for every candidate at once (no gradient is stored).
    Scalar palettes act through per-pair gradient sums (`_ValueIndex`), others through their
    dequantized weight, rebuilt on the fly."""

    def __init__(self, w: torch.Tensor, palettes: list[Palette]) -> None:
        self.n = len(palettes)
        # per grouping: its pair index, the columns it serves and their (n_pairs, columns) q - u
        self.scalar: list[tuple[_ValueIndex, list[int], torch.Tensor]] = []
        self.other: list[tuple[int, Palette]] = []
        by_rows: dict[int | None, list[int]] = {}
        for i, p in enumerate(palettes):
            if _is_value_function(p.spec):
                by_rows.setdefault(_group_rows(p.spec), []).append(i)
            else:
                self.other.append((i, p))
        for rows, cols in by_rows.items():
            index = _ValueIndex(w, rows)
            pos = index.positions(w)
            change = torch.stack([_values_at(palettes[i], pos).double() - index.u for i in cols], 1)
            self.scalar.append((index, cols, change))

    def __call__(self, w: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor]:
        """(b, candidates) float64: <g_s, dW> for every sample and candidate."""
        out = torch.empty(gs.shape[0], self.n, dtype=torch.float64)
        resid = _fp16_residual(w, gs)[:, None] if self.scalar else None
        for index, cols, change in self.scalar:
            out[:, cols] = index.fold(w, gs).double() @ change + resid
        wf = w.detach().reshape(-1).float()
        for i, p in self.other:
            out[:, i] = (gs @ (p.dequantize().reshape(-1).float() - wf)).double()
        return (out,)

    def zeros(self, b: int) -> tuple[torch.Tensor]:
        return (torch.zeros(b, self.n, dtype=torch.float64),)


# ---------------------------------------------------------------------------------------------
# Model state guard


@contextmanager
def _guard(model: nn.Module, freeze: bool) -> Iterator[list]:
    """eval mode (and, with `freeze`, requires_grad off everywhere) for the probe; on exit restore
    training flags, requires_grad flags and .grad exactly, and remove the hooks put in the list."""
    training = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    hooks: list = []
    try:
        model.eval()
        if freeze:
            for p in params:
                p.requires_grad_(False)
        yield hooks
    finally:
        for h in hooks:
            h.remove()
        for p, f, g in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = g
        for m, t in training:
            m.training = t


# ---------------------------------------------------------------------------------------------
# Fast probe: per-sample weight gradients from hooks, folded into sketches


def _per_sample_grad(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(batch, numel) float32 gradient of each sample's share of v^T f w.r.t. module.weight."""
    w = module.weight
    b = x.shape[0]
    if isinstance(module, nn.Linear):
        xs = x.reshape(b, -1, x.shape[-1]).float()
        gs = g.reshape(b, -1, g.shape[-1]).float()
        return torch.bmm(gs.transpose(1, 2), xs).reshape(b, -1)
    padding = module.padding
    if module.padding_mode != "zeros":
        x = nn.functional.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * (x.dim() - 2)
    if isinstance(padding, str):  # 'same' / 'valid': let autograd work out the padding
        out = []
        for s in range(b):
            wt = w.detach().float().requires_grad_(True)
            y = module._conv_forward(x[s : s + 1].float(), wt, None)
            out.append(torch.autograd.grad(y, wt, g[s : s + 1].float())[0].reshape(-1))
        return torch.stack(out)
    wf = w.detach().float()
    out = []
    for s in range(b):
        gw = torch.ops.aten.convolution_backward(
            g[s : s + 1].float(), x[s : s + 1].float(), wf, None, list(module.stride), list(padding),
            list(module.dilation), False, [0] * (x.dim() - 2), module.groups, [False, True, False],
        )[1]
        out.append(gw.reshape(-1))
    return torch.stack(out)


class _Recorder:
    """Forward hooks on target layers; each backward pass folds every layer's per-sample gradients
    at once with that layer's `fold` (gs -> a (b, width) block, and optionally a (b,) residual):
    a `_Streamed` layer's inner products with its candidates, or a sketch (`_ValueIndex.fold`, or
    the gradients themselves)."""

    def __init__(self, modules: dict[str, nn.Module], folds: dict[str, Any], importance: bool) -> None:
        self.folds = folds
        self.blocks: dict[str, dict[tuple[int, int], tuple]] = {n: {} for n in modules}
        self.importance = {n: torch.zeros(m.weight.numel()) for n, m in modules.items()} if importance else None
        self.leaves: list[torch.Tensor] = []
        self.unit = 0
        self.probe = 0
        self.batch = 0

    def hook(self, name: str):
        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            x = (args[0] if args else kwargs["input"]).detach()
            if not isinstance(output, torch.Tensor):
                return
            if not output.requires_grad:
                output.requires_grad_(True)
                self.leaves.append(output)
            version = x._version
            output.register_hook(lambda g: self._on_grad(name, module, x, version, g))

        return forward_hook

    def _on_grad(self, name: str, module: nn.Module, x: torch.Tensor, version: int, g: torch.Tensor) -> None:
        if x._version != version:
            raise RuntimeError(f"{name}: its input was modified in place after the layer ran; cannot probe")
        if x.shape[0] != self.batch or g.shape[0] != self.batch:
            raise ValueError(
                f"{name} sees a batch of {x.shape[0]} but the output has {self.batch} samples: per-sample "
                "errors need the first dimension to be the sample axis in every target layer"
            )
        gs = _per_sample_grad(module, x, g)
        if self.importance is not None:
            self.importance[name] += (gs * gs).sum(0)
        fold = self.folds[name]
        out = fold(module.weight, gs)
        key = (self.unit, self.probe)
        blocks = self.blocks[name]
        # a layer called more than once: gradients, and so every fold of them, add up
        blocks[key] = tuple(a + b for a, b in zip(blocks[key], out)) if key in blocks else out

    def rows(self, name: str, unit_batches: list[int], n_probes: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """A layer's folded blocks stacked in row order (unit, pass, sample), zeros where it got no
        gradient (it does not reach the output), and the sample of each row."""
        offsets = np.cumsum([0] + unit_batches)
        keys = [(u, k) for u in range(len(unit_batches)) for k in range(n_probes)]
        blocks = self.blocks.pop(name)
        fold = self.folds[name]
        parts = [blocks.pop(key, None) or fold.zeros(unit_batches[key[0]]) for key in keys]
        sample = torch.cat([torch.arange(offsets[u], offsets[u] + unit_batches[u]) for u, _ in keys])
        return tuple(torch.cat(p) for p in zip(*parts)), sample


class _SketchFold:
    """Keeps a layer's gradients for later scoring (`keep_sketch`): per-pair sums when `index` is
    given (all its specs are scalar palettes on one grouping), else the gradients themselves."""

    def __init__(self, index: _ValueIndex | None, numel: int) -> None:
        self.index, self.numel = index, numel

    def __call__(self, w: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.index.fold(w, gs), _fp16_residual(w, gs)) if self.index is not None else (gs,)

    def zeros(self, b: int) -> tuple[torch.Tensor, ...]:
        if self.index is None:
            return (torch.zeros(b, self.numel),)
        return torch.zeros(b, self.index.n), torch.zeros(b, dtype=torch.float64)

    def sketch(self, blocks: tuple[torch.Tensor, ...], sample: torch.Tensor) -> _Sketch:
        if self.index is None:
            return _Sketch("dense", blocks[0], sample)
        return _Sketch("values", blocks[0], sample, self.index, blocks[1])


def _fast_passes(model, targets, units, folds, n_probes, seed, want_importance, progress):
    """Forward once per unit, K backward passes each, every layer's gradients folded by its fold;
    returns {layer: (stacked blocks, sample of each row)}, per-sample peaks and sizes, importance."""
    gen = torch.Generator().manual_seed(seed)
    with _guard(model, freeze=True) as hooks:
        rec = _Recorder(targets, folds, want_importance)
        for name, m in targets.items():
            hooks.append(m.register_forward_hook(rec.hook(name), with_kwargs=True))
        peaks, sizes, batches = [], [], []
        bar = tqdm(total=len(units) * n_probes, desc="probe passes", disable=not progress, leave=False)
        try:
            for u, unit in enumerate(units):
                rec.unit, rec.leaves = u, []
                with torch.enable_grad():
                    out = unit(model)
                    b = out.shape[0]
                    rec.batch = b
                    batches.append(b)
                    flat = out.detach().reshape(b, -1)
                    peaks.append(flat.abs().amax(1).double())
                    sizes.append(torch.full((b,), flat.shape[1], dtype=torch.int64))
                    for k in range(n_probes):
                        rec.probe = k
                        v = torch.randint(0, 2, out.shape, generator=gen).float() * 2 - 1
                        if out.requires_grad and rec.leaves:
                            torch.autograd.grad((out * v).sum(), rec.leaves, retain_graph=k < n_probes - 1, allow_unused=True)
                        bar.update()
                del out
        finally:
            bar.close()
        folded = {n: rec.rows(n, batches, n_probes) for n in targets}
        rows = sum(batches) * n_probes
        imp = {n: (t / rows).reshape(targets[n].weight.shape) for n, t in rec.importance.items()} if want_importance else None
    return folded, torch.cat(peaks).numpy(), torch.cat(sizes).numpy(), imp


# ---------------------------------------------------------------------------------------------
# Exhaustive probe


@torch.no_grad()
def _reference(model: nn.Module, units) -> list[torch.Tensor]:
    return [unit(model).detach().clone() for unit in units]


@torch.no_grad()
def _measure(model: nn.Module, units, refs: list[torch.Tensor]) -> np.ndarray:
    """Per-sample MSE of the model's outputs against the reference outputs."""
    out = []
    for unit, ref in zip(units, refs):
        y = unit(model)
        out.append(((y.double() - ref.double()) ** 2).reshape(ref.shape[0], -1).mean(1))
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------
# Cache


def _fingerprint(targets: dict[str, nn.Module], specs, method, seed, n_probes, description) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([method, seed, n_probes, description, [s.to_dict() for s in specs]], sort_keys=True).encode())
    for n, m in targets.items():
        w = m.weight.detach()
        h.update(f"{n}{tuple(w.shape)}{w.dtype}{float(w.double().sum())!r}{float(w.double().abs().sum())!r}".encode())
    return h.hexdigest()


class _Cache:
    """A directory holding finished layers (JSON) and, for the fast probe, the sketches."""

    def __init__(self, path: str | os.PathLike | None, fingerprint: str) -> None:
        self.dir = Path(path) if path is not None else None
        self.done: dict[str, list[list[float]]] = {}
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self.dir / "state.json"
        if state.exists():
            try:
                d = json.loads(state.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{state}: corrupt probe cache ({e}); delete {self.dir}") from None
            if d.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"probe cache {self.dir} belongs to another model, probe set or settings; "
                    "delete it or pass another cache path"
                )
            self.done = d["done"]
        self.fingerprint = fingerprint

    def add(self, name: str, errors: np.ndarray) -> None:
        self.done[name] = [[None if math.isnan(x) else x for x in row] for row in errors.tolist()]
        if self.dir is not None:
            doc = {"fingerprint": self.fingerprint, "done": self.done}
            write_atomic(self.dir / "state.json", json.dumps(doc, sort_keys=True))

    def get(self, name: str) -> np.ndarray | None:
        e = self.done.get(name)
        return None if e is None else np.array([[np.nan if x is None else x for x in r] for r in e], dtype=np.float64)

    def load_tensors(self, name: str) -> Any:
        path = self.dir / name if self.dir is not None else None
        return torch.load(path, weights_only=False) if path is not None and path.exists() else None

    def save_tensors(self, name: str, obj: Any) -> None:
        if self.dir is not None:
            tmp = self.dir / (name + ".tmp")
            torch.save(obj, tmp)
            os.replace(tmp, self.dir / name)


# ---------------------------------------------------------------------------------------------
# Entry point


CHUNK_NUMEL = 1 << 22  # layers clustered together in one parallel call (palettes freed after)


def _chunks(names: list[str], numel: dict[str, int]) -> Iterator[list[str]]:
    """Consecutive groups of layers of about CHUNK_NUMEL weights in total."""
    chunk: list[str] = []
    total = 0
    for n in names:
        chunk.append(n)
        total += numel[n]
        if total >= CHUNK_NUMEL:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


def _errors(cand: list[PaletteSpec], ok: list[PaletteSpec], per_spec: Iterator[np.ndarray], n_samples: int) -> np.ndarray:
    """(len(cand), n_samples) errors, NaN where a spec does not apply; `per_spec` follows `ok`."""
    err = np.full((len(cand), n_samples), np.nan)
    for spec, e in zip(ok, per_spec):
        err[cand.index(spec)] = e
    return err


def _fit(targets, chunk: list[str], ok_specs, seed: int) -> tuple[list[list[Palette]], float]:
    """Every candidate palette of a chunk of layers, in one parallel call; and its seconds."""
    t0 = time.perf_counter()
    fitted = fit_palettes_batch([(targets[n].weight.detach(), ok_specs[n], None) for n in chunk], seed=seed, names=chunk)
    return fitted, time.perf_counter() - t0


def _probe_streamed(model, targets, units, cand, ok_specs, store, n_probes, seed, importance, progress):
    """Fast probe, palettes first: fit every candidate, then one forward and `n_probes` backward
    passes fold each layer's per-sample gradients into <g, dW> for all its candidates at once.
    Memory: the model, activations, and per layer its candidates in compact form (per (group,
    value) pair for scalar palettes); no gradient is kept. The cache keeps fitted chunks."""
    todo = [n for n in targets if store.get(n) is None]
    passes = store.load_tensors("passes.pt")
    if importance and passes is not None and passes["importance"] is None:
        todo = list(targets)
    errors = {n: store.get(n) for n in targets if n not in todo}
    cluster_s = 0.0
    if todo or passes is None:
        folds: dict[str, _Streamed] = {}
        bar = tqdm(total=len(todo), desc="fit palettes", disable=not progress, leave=False)
        for i, chunk in enumerate(_chunks(todo, {n: targets[n].weight.numel() for n in todo})):
            cached = store.load_tensors(f"fit-{i}.pt")
            if cached is None or list(cached) != chunk:
                fitted, secs = _fit(targets, chunk, ok_specs, seed)
                cluster_s += secs
                cached = {n: _Streamed(targets[n].weight, pals) for n, pals in zip(chunk, fitted)}
                del fitted
                store.save_tensors(f"fit-{i}.pt", cached)
            folds.update(cached)
            bar.update(len(chunk))
        bar.close()
        folded, peak, size, imp = _fast_passes(
            model, {n: targets[n] for n in todo}, units, folds, n_probes, seed, importance, progress
        )
        passes = {"peak": peak, "size": size, "importance": imp}
        store.save_tensors("passes.pt", passes)
        for n in todo:
            (z,), sample = folded[n]
            e = _fold_probes(z, sample, n_probes, len(peak)) / size[:, None]
            errors[n] = _errors(cand, ok_specs[n], iter(e.T), len(peak))
            store.add(n, errors[n])
    return (
        {n: errors[n] for n in targets}, passes["peak"], passes["size"], passes["importance"], None, cluster_s
    )


def _probe_sketched(model, targets, units, cand, ok_specs, store, n_probes, seed, importance, progress):
    """Fast probe, gradients first (`keep_sketch`): the passes keep per-layer gradient sketches
    (per-pair sums where every candidate is a scalar palette on one grouping, else the per-sample
    gradients), then every candidate is fitted and scored against them; the sketches stay for
    `Sensitivity.estimate`. The cache keeps the sketches and finished layers."""
    state = store.load_tensors("sketch.pt")
    todo = [n for n in targets if store.get(n) is None]
    if state is None or (importance and state["importance"] is None):
        folds = {}
        for n, m in targets.items():
            groupings = {_group_rows(s) for s in ok_specs[n]}
            scalar = len(groupings) == 1 and all(_is_value_function(s) for s in ok_specs[n])
            folds[n] = _SketchFold(_ValueIndex(m.weight, groupings.pop()) if scalar else None, m.weight.numel())
        folded, peak, size, imp = _fast_passes(model, targets, units, folds, n_probes, seed, importance, progress)
        sketches = {n: folds[n].sketch(*folded[n]) for n in targets}
        state = {"sketches": sketches, "peak": peak, "size": size, "importance": imp}
        if todo:
            store.save_tensors("sketch.pt", state)
    sketches, peak, size = state["sketches"], state["peak"], state["size"]
    errors = {n: store.get(n) for n in targets if n not in todo}
    cluster_s = 0.0
    bar = tqdm(total=len(todo), desc="score layers", disable=not progress, leave=False)
    for chunk in _chunks(todo, {n: targets[n].weight.numel() for n in todo}):
        fitted, secs = _fit(targets, chunk, ok_specs, seed)
        cluster_s += secs
        for name, pals in zip(chunk, fitted):
            score = _Scorer(sketches[name], targets[name].weight, n_probes, len(peak))
            errors[name] = _errors(cand, ok_specs[name], (score(p) / size for p in pals), len(peak))
            store.add(name, errors[name])
            bar.update()
    bar.close()
    return {n: errors[n] for n in targets}, peak, size, state["importance"], sketches, cluster_s


def _candidate_specs(nbits, specs, granularities, group_size) -> list[PaletteSpec]:
    if specs is not None:
        out = list(dict.fromkeys(specs))
        for s in out:
            if not isinstance(s, PaletteSpec):
                raise ValueError(f"specs must be PaletteSpec objects, got {type(s).__name__}")
    else:
        for b in nbits:
            if b not in NBITS:
                raise ValueError(f"nbits must be among {NBITS}, got {b!r}")
        out = [
            PaletteSpec(nbits=b, granularity=g, group_size=group_size if g == "per_grouped_channel" else None)
            for g in granularities
            for b in nbits
        ]
    if not out:
        raise ValueError("no candidate specs")
    return out


def _applicable(spec: PaletteSpec, shape: tuple[int, ...], name: str) -> bool:
    try:
        spec.n_groups(shape[0], name)
        return True
    except ValueError:
        return False


def probe_sensitivity(
    model: nn.Module,
    inputs: Any = None,
    *,
    method: str = "fast",
    nbits: Sequence[int] = (1, 2, 3, 4, 6, 8),
    specs: Sequence[PaletteSpec] | None = None,
    granularities: Sequence[str] = ("per_tensor",),
    group_size: int = 16,
    seed: int = 0,
    n_probes: int = 16,
    min_numel: int = DEFAULT_MIN_NUMEL,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    text_encoder: nn.Module | None = None,
    tokenizer: Any = None,
    importance: bool = False,
    keep_sketch: bool = False,
    n_samples: int = 8,
    batch_size: int | None = None,
    scheduler: Any = None,
) -> Sensitivity:
    """Output error of palettizing each target layer alone at each candidate spec.

    `inputs`: a tuple of tensors, a list of such tuples (or dicts of keyword tensors), or a callable
    `model -> output`; None synthesises `n_samples` data-free samples (`palette.probe_inputs`).
    `method`: "fast" (one forward, `n_probes` backward passes, first order) or "exhaustive".
    `importance=True` (fast) adds `Sensitivity.importance`: per-layer mean squared gradient of
    v^T f, the Gauss-Newton diagonal, for `fit_palettes(..., importance=...)`.
    `keep_sketch=True` (fast) keeps the gradient sketches for `Sensitivity.estimate`.
    `cache`: a directory; a rerun with the same arguments resumes where an interrupted run stopped.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "exhaustive" and (importance or keep_sketch):
        raise ValueError("importance and keep_sketch come from gradients: use method='fast'")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    t_start = time.perf_counter()
    cand = _candidate_specs(nbits, specs, granularities, group_size)
    targets = target_layers(model, min_numel)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no target layers (Linear/Conv with >= {min_numel} weights)")
    probe_set: ProbeSet = make_probe_set(
        model, inputs, seed=seed, n_samples=n_samples, batch_size=batch_size,
        text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
    )
    units = probe_set.units
    shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
    applicable = {n: [_applicable(s, shapes[n], n) for s in cand] for n in targets}
    n_eff = n_probes if method == "fast" else 0
    store = _Cache(cache, _fingerprint(targets, cand, method, seed, n_eff, probe_set.description))

    if method == "fast":
        ok_specs = {n: [s for s, a in zip(cand, applicable[n]) if a] for n in targets}
        run = _probe_sketched if keep_sketch else _probe_streamed
        errors, peak, size, imp, sketches, cluster_s = run(
            model, targets, units, cand, ok_specs, store, n_probes, seed, importance, progress
        )
        forwards, backwards = 1, n_probes
    else:
        errors, cluster_s, imp, sketches = {}, 0.0, None, None
        with _guard(model, freeze=False):
            refs = _reference(model, units)
            peak = torch.cat([r.reshape(r.shape[0], -1).abs().amax(1).double() for r in refs]).numpy()
            size = np.concatenate([np.full(r.shape[0], r[0].numel(), dtype=np.int64) for r in refs])
            for name in tqdm(targets, desc="exhaustive", disable=not progress, leave=False):
                cached = store.get(name)
                if cached is not None:
                    errors[name] = cached
                    continue
                module = targets[name]
                err = np.full((len(cand), len(peak)), np.nan)
                ok = [s for s, a in zip(cand, applicable[name]) if a]
                t0 = time.perf_counter()
                pals = iter(fit_palettes(module.weight, ok, seed=seed, name=name))
                cluster_s += time.perf_counter() - t0
                with keep_original(model, [name]), torch.no_grad():
                    for i, a in enumerate(applicable[name]):
                        if a:
                            module.weight.copy_(next(pals).dequantize().reshape(shapes[name]).to(module.weight.dtype))
                            err[i] = _measure(model, units, refs)
                errors[name] = err
                store.add(name, err)
        forwards, backwards = 1 + sum(sum(a) for a in applicable.values()), 0

    nbytes = {n: [s.nbytes(shapes[n], n) if a else None for s, a in zip(cand, applicable[n])] for n in targets}
    cost = Cost(float(forwards + 2 * backwards), forwards, backwards, time.perf_counter() - t_start, cluster_s)
    sens = Sensitivity(
        layers={n: LayerInfo(shapes[n], math.prod(shapes[n])) for n in targets},
        specs=cand, errors=errors, nbytes=nbytes, peak=np.asarray(peak, dtype=np.float64),
        sample_size=np.asarray(size, dtype=np.int64), method=method,
        inputs_description=probe_set.description, seed=seed, n_probes=n_eff, cost=cost,
        importance=imp if importance else None,
    )
    if keep_sketch:
        for n, sk in sketches.items():
            sk.weight = targets[n].weight
            sk.checksum = float(sk.weight.detach().double().sum())
        sens.sketch = sketches
    return sens
