"""`Sensitivity`: the probe's result -- per layer, per candidate spec, per probe sample, the output
error of palettizing that layer alone -- with stored sizes, the probe's cost, and its JSON file.

A mapping's error is predicted additively (per sample: sum of layer errors, then Apple's PSNR per
sample, averaged).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._jsonio import (LoadError, _short, check_header, dict_field, float_field, int_field, list_field, read_json,
                       plain, str_field, write_atomic)
from ..cluster import Palette
from ..metrics import psnr_from_mse
from ..spec import PaletteSpec
from .sketch import Scorer, Sketch

FORMAT = "palette.sensitivity"
VERSION = 1
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
    estimate: Any = None  # the fast probe's ProbeEstimate (budget.py), made before it ran

    def to_dict(self) -> dict[str, Any]:
        return {"forward_equivalents": self.forward_equivalents, "forwards": self.forwards, "backwards": self.backwards}


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
    sketch: dict[str, Sketch] | None = field(default=None, repr=False)

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

    def _mapping_mse(self, mapping: Mapping[str, PaletteSpec | None]) -> np.ndarray:
        total = np.zeros(len(self.peak))
        for name, spec in mapping.items():
            if spec is not None:
                total += self.errors_per_sample(name, spec)
        return total

    def predict_psnr(self, mapping: Mapping[str, PaletteSpec | None]) -> float:
        """Additive prediction of Apple's latent PSNR (dB): per-sample sum of layer errors, per-sample
        PSNR, averaged over samples."""
        return self.psnr_of(self._mapping_mse(mapping))

    def psnr_of(self, per_sample_mse: np.ndarray) -> float:
        """Apple's PSNR (dB) of a per-sample output MSE on these probe samples."""
        return float(psnr_from_mse(per_sample_mse, self.peak).mean())

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
        e = Scorer(sk, sk.weight, self.n_probes, len(self.peak))(new) / self.sample_size
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
        write_atomic(Path(path), json.dumps(self.to_dict(), sort_keys=True, indent=1, allow_nan=False, default=plain) + "\n")

    @classmethod
    def from_dict(cls, d: Any, where: str = "sensitivity") -> "Sensitivity":
        """The sensitivity a parsed JSON document describes; every field's type and range is
        checked, anything wrong is a `LoadError` (a ValueError) naming `where` and the field."""
        check_header(d, FORMAT, VERSION, where, "sensitivity")
        try:
            specs = [PaletteSpec.from_dict(s, f"specs[{i}]") for i, s in enumerate(list_field(d["specs"], "specs"))]
            if not specs:
                raise ValueError("specs: empty")
            samples = dict_field(d["samples"], "samples")
            peak = np.asarray([float_field(x, "samples.peak", 0.0) for x in list_field(samples["peak"], "samples.peak")],
                              dtype=np.float64)
            size = np.asarray([int_field(x, "samples.size", 1) for x in list_field(samples["size"], "samples.size")],
                              dtype=np.int64)
            if peak.shape != size.shape or len(peak) == 0:
                raise ValueError("samples.peak and samples.size must be equal-length non-empty lists")
            layers, errors, nbytes = {}, {}, {}
            for k, rec in enumerate(list_field(d["layers"], "layers")):
                rec = dict_field(rec, f"layers[{k}]")
                name = str_field(rec["name"], f"layers[{k}].name")
                if name in layers:
                    raise ValueError(f"layer {name!r} appears twice")
                shape = tuple(int_field(x, f"layer {name!r} shape", 1) for x in list_field(rec["shape"], f"layer {name!r} shape"))
                numel = int_field(rec["numel"], f"layer {name!r} numel", 1)
                if not shape or math.prod(shape) != numel:
                    raise ValueError(f"layer {name!r}: numel {numel} does not match shape {list(shape)}")
                layers[name] = LayerInfo(shape, numel)
                rows = list_field(rec["errors"], f"layer {name!r} errors")
                err = np.array([[np.nan if x is None else float_field(x, f"layer {name!r} errors", 0.0)
                                 for x in list_field(row, f"layer {name!r} errors")] for row in rows], dtype=np.float64)
                if err.shape != (len(specs), len(peak)):
                    raise ValueError(f"layer {name}: errors shape {err.shape} != ({len(specs)}, {len(peak)})")
                nb = list_field(rec["nbytes"], f"layer {name!r} nbytes")
                if len(nb) != len(specs):
                    raise ValueError(f"layer {name}: {len(nb)} nbytes for {len(specs)} specs")
                errors[name] = err
                nbytes[name] = [None if b is None else int_field(b, f"layer {name!r} nbytes", 1) for b in nb]
            c = dict_field(d["cost"], "cost")
            cost = Cost(float_field(c["forward_equivalents"], "cost.forward_equivalents", 0.0),
                        int_field(c["forwards"], "cost.forwards"), int_field(c["backwards"], "cost.backwards"))
            method = d["method"]
            if method not in METHODS:
                raise ValueError(f"unknown method {_short(method)}")
            return cls(layers, specs, errors, nbytes, peak, size, method,
                       str_field(d["inputs_description"], "inputs_description"),
                       int_field(d["seed"], "seed", None), int_field(d["n_probes"], "n_probes"), cost)
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
            detail = f"missing {e}" if isinstance(e, KeyError) else str(e)
            raise LoadError(f"{where}: invalid sensitivity data: {detail}; probe again (palette analyze)") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Sensitivity":
        return cls.from_dict(read_json(path, "sensitivity"), str(path))
