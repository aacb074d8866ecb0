"""Per-layer sensitivity: the output error of palettizing each target layer at each candidate spec.

Two estimators, on the same probe set (`palette.probe_inputs`), against the unmodified model run in
its own dtype (the "16-bit model" of Apple's MBP; fp32 on CPU):

- `exhaustive` (Apple MBP style): palettize one layer at one spec, run the probe set, measure the
  per-sample MSE, restore that layer. 1 + layers x specs forward passes.
- `fast` (first order, randomized): the output error of a weight change dW_l is e = J_l dW_l, and
  ||J_l dW_l||^2 = E_v[(v^T J_l dW_l)^2] = E_v[<g_l(v), dW_l>^2] for Rademacher v in output space,
  g_l(v) = d(v^T f)/dW_l. One forward and K backward passes (v differs per sample and pass) give,
  through hooks on every target layer, *per-sample* weight gradients (from each layer's input and
  output gradient: the batch never mixes samples). Each gradient is folded at once into a sketch:
  for per-tensor scalar specs, dW_l is a function of the weight's fp16 value, so <g, dW> =
  sum_u H(u) (q(u) - u) + <g, fp16(W) - W> with H(u) the sum of g over the weights of value u --
  one histogram over at most 65536 values per (layer, sample, pass), exact, whatever the LUT
  (weighted or not). Other layouts keep the gradient itself. Scoring then fits all candidate
  palettes of a layer in one `fit_palettes` call and takes inner products: cost 1 + 2K
  forward-equivalents plus clustering, independent of layers x specs. The squared gradients give a
  Fisher (Gauss-Newton diagonal) importance for weighted k-means on the side.

A mapping's error is predicted additively (per sample: sum of layer errors, then Apple's PSNR per
sample, averaged). With `keep_sketch=True`, `Sensitivity.estimate(name, palette_or_weight)` scores
any other palette of a layer -- e.g. one fitted with `importance` -- without a second probe.

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

    kind "values": `data` (rows, n_values) sums of the gradient over weights of each distinct fp16
    value `values` (int64 bit patterns), `resid` (rows,) = <g, fp16(W) - W>.
    kind "dense": `data` (rows, numel), the per-sample gradients themselves.
    """

    kind: str
    data: torch.Tensor
    sample: torch.Tensor
    values: torch.Tensor | None = None
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

        A "values" sketch (per-tensor scalar specs) scores any new weight that is a function of the
        old weight's value, e.g. any per-tensor scalar palette, importance-weighted or not."""
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
    """Whether palettizing with `spec` maps each weight by its fp16 value alone."""
    return spec.granularity == "per_tensor" and spec.cluster_dim == 1 and not spec.per_channel_scale


def _rep_positions(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For each distinct value, the first position holding it."""
    first = torch.full((N_KEYS,), keys.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, keys, torch.arange(keys.numel()), reduce="amin")
    return first[values]


class _Scorer:
    """Scores new weights of one layer against its sketch: per-sample sum of squared output error
    (not yet divided by the sample size). Per-layer work is done once, not once per palette."""

    def __init__(self, sk: _Sketch, weight: torch.Tensor, n_probes: int, n_samples: int) -> None:
        self.sk, self.n_probes, self.n_samples = sk, n_probes, n_samples
        self.weight = weight.detach().reshape(-1)
        if sk.kind == "values":
            self.keys = _fp16_keys(self.weight)
            self.pos = _rep_positions(self.keys, sk.values)
            self.u = sk.values.to(torch.int16).view(torch.float16).double()
            self.data = sk.data.double()

    def __call__(self, new: Palette | torch.Tensor) -> np.ndarray:
        sk = self.sk
        if sk.kind == "dense":
            w_new = new.dequantize() if isinstance(new, Palette) else new.detach()
            self._check_numel(w_new)
            return self._fold(sk.data @ (w_new.reshape(-1).float() - self.weight.float()))
        if isinstance(new, Palette) and _is_value_function(new.spec):
            q = new.lut[0, new.indices.reshape(-1)[self.pos].long(), 0].double()
        else:
            w_new = (new.dequantize() if isinstance(new, Palette) else new.detach()).reshape(-1)
            self._check_numel(w_new)
            q = w_new[self.pos].double()
            slot = torch.zeros(N_KEYS, dtype=torch.int64)
            slot[sk.values] = torch.arange(len(sk.values))
            if not torch.equal(w_new.double(), q[slot[self.keys]]):
                raise ValueError(
                    "this layer's sketch holds per-value gradient sums: the new weight must be a "
                    "function of the old weight's fp16 value (a per-tensor scalar palette); include "
                    "such a spec in the probe's `specs` to keep dense gradients"
                )
        return self._fold(self.data @ (q - self.u) + sk.resid)

    def _check_numel(self, w_new: torch.Tensor) -> None:
        if w_new.numel() != self.weight.numel():
            raise ValueError(f"new weight has {w_new.numel()} elements, the layer {self.weight.numel()}")

    def _fold(self, z: torch.Tensor) -> np.ndarray:
        """Mean of z^2 over the passes of each sample (Hutchinson estimate of ||J dW||^2)."""
        out = torch.zeros(self.n_samples, dtype=torch.float64).index_add_(0, self.sk.sample, z.double() ** 2)
        return (out / self.n_probes).numpy()


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
    """Forward hooks on target layers; each backward pass folds per-sample gradients into sketches."""

    def __init__(self, modules: dict[str, nn.Module], dense: set[str], importance: bool) -> None:
        self.modules = modules
        self.dense = dense
        self.blocks: dict[str, dict[tuple[int, int], torch.Tensor]] = {n: {} for n in modules}
        self.resid: dict[str, dict[tuple[int, int], torch.Tensor]] = {n: {} for n in modules}
        self.slots: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.importance = {n: torch.zeros(m.weight.numel()) for n, m in modules.items()} if importance else None
        self.leaves: list[torch.Tensor] = []
        self.unit = 0
        self.probe = 0
        self.batch = 0
        for n, m in modules.items():
            if n not in dense:
                keys = _fp16_keys(m.weight)
                present = torch.zeros(N_KEYS, dtype=torch.bool)
                present[keys] = True
                self.values[n] = present.nonzero().reshape(-1)
                self.slots[n] = torch.cumsum(present.to(torch.int64), 0) - 1

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
        key = (self.unit, self.probe)
        if name in self.dense:
            block, resid = gs, None
        else:
            w = module.weight.detach().reshape(-1)
            keys = _fp16_keys(w)
            idx = self.slots[name][keys]
            n_v = len(self.values[name])
            block = torch.stack([torch.bincount(idx, weights=gs[s], minlength=n_v) for s in range(gs.shape[0])])
            resid = (gs @ (w.to(torch.float16).float() - w.float())).double()
        blocks = self.blocks[name]
        if key in blocks:  # a layer called more than once: gradients add up
            blocks[key] = blocks[key] + block
            if resid is not None:
                self.resid[name][key] = self.resid[name][key] + resid
        else:
            blocks[key] = block
            if resid is not None:
                self.resid[name][key] = resid

    def sketches(self, unit_batches: list[int], n_probes: int) -> dict[str, _Sketch]:
        """Rows ordered by unit, pass, sample; layers that never got a gradient get zero rows."""
        offsets = np.cumsum([0] + unit_batches)
        out = {}
        for name, m in self.modules.items():
            width = m.weight.numel() if name in self.dense else len(self.values[name])
            rows, resid, sample = [], [], []
            for u, b in enumerate(unit_batches):
                for k in range(n_probes):
                    blk = self.blocks[name].pop((u, k), None)
                    rows.append(blk if blk is not None else torch.zeros(b, width))
                    if name not in self.dense:
                        r = self.resid[name].pop((u, k), None)
                        resid.append(r if r is not None else torch.zeros(b, dtype=torch.float64))
                    sample.append(torch.arange(offsets[u], offsets[u] + b))
            data = torch.cat(rows)
            sk = _Sketch("dense", data, torch.cat(sample))
            if name not in self.dense:
                sk = _Sketch("values", data, sk.sample, self.values[name], torch.cat(resid))
            out[name] = sk
        return out


def _fast_passes(model, targets, units, dense, n_probes, seed, want_importance, progress):
    """Forward once per unit, K backward passes each; returns sketches, sample stats, importance."""
    gen = torch.Generator().manual_seed(seed)
    with _guard(model, freeze=True) as hooks:
        rec = _Recorder(targets, dense, want_importance)
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
        sketches = rec.sketches(batches, n_probes)
        rows = sum(batches) * n_probes
        imp = {n: (t / rows).reshape(targets[n].weight.shape) for n, t in rec.importance.items()} if want_importance else None
    return sketches, torch.cat(peaks).numpy(), torch.cat(sizes).numpy(), imp


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
    errors: dict[str, np.ndarray] = {}
    cluster_s = 0.0
    imp = sketches = None

    if method == "fast":
        dense = {n for n in targets if not all(_is_value_function(s) for s, ok in zip(cand, applicable[n]) if ok)}
        state = store.load_tensors("sketch.pt")
        todo = [n for n in targets if store.get(n) is None]
        if state is None or (importance and state["importance"] is None):
            sk, peak, size, imp = _fast_passes(model, targets, units, dense, n_probes, seed, importance, progress)
            state = {"sketches": sk, "peak": peak, "size": size, "importance": imp}
            if todo:
                store.save_tensors("sketch.pt", state)
        sketches, peak, size, imp = state["sketches"], state["peak"], state["size"], state["importance"]
        n_samp = len(peak)
        errors = {n: store.get(n) for n in targets if n not in todo}
        bar = tqdm(total=len(todo), desc="score layers", disable=not progress, leave=False)
        for chunk in _chunks(todo, {n: m.weight.numel() for n, m in targets.items()}):
            items = [(targets[n].weight.detach(), [s for s, a in zip(cand, applicable[n]) if a], None) for n in chunk]
            t0 = time.perf_counter()
            fitted = fit_palettes_batch(items, seed=seed, names=chunk)
            cluster_s += time.perf_counter() - t0
            for name, pals in zip(chunk, fitted):
                score = _Scorer(sketches[name], targets[name].weight, n_probes, n_samp)
                pals_it = iter(pals)
                err = np.full((len(cand), n_samp), np.nan)
                for i, a in enumerate(applicable[name]):
                    if a:
                        err[i] = score(next(pals_it)) / size
                errors[name] = err
                store.add(name, err)
                bar.update()
            del fitted
        bar.close()
        errors = {n: errors[n] for n in targets}
        forwards, backwards = 1, n_probes
    else:
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
