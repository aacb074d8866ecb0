"""The probe's disk cache: a directory holding finished layers (JSON) and, for the fast probe, the
fitted candidates and pass results, so that an interrupted run resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._jsonio import LoadError, atomic_path, read_json, write_atomic

FORMAT = 2  # raised whenever what the cache pickles (sketch.Streamed, unit results) changes shape


def fingerprint(targets: dict[str, nn.Module], specs, method, seed, n_probes, description) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, method, seed, n_probes, description, [s.to_dict() for s in specs]],
                        sort_keys=True).encode())
    for n, m in targets.items():
        w = m.weight.detach()
        h.update(f"{n}{tuple(w.shape)}{w.dtype}{float(w.double().sum())!r}{float(w.double().abs().sum())!r}".encode())
    return h.hexdigest()


class Cache:
    """A directory holding finished layers (JSON) and, for the fast probe, the fitted candidates
    and finished units (tensors). Its state file records the fingerprint of the model, probe set
    and settings it belongs to (one per rank under torch.distributed)."""

    def __init__(self, path: str | os.PathLike | None, fingerprint: str, rank: int = 0) -> None:
        self.dir = Path(path) if path is not None else None
        self.done: dict[str, list[list[float]]] = {}
        self.fingerprint = fingerprint
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = self.dir / ("state.json" if rank == 0 else f"state-rank{rank}.json")
        state = self.state
        if not state.exists():
            self._write()
        else:
            d = read_json(state, "probe cache state", f"; delete {self.dir} (the probe starts afresh)")
            if not isinstance(d, dict) or not isinstance(d.get("done"), dict) or not all(
                    isinstance(v, list) and all(isinstance(r, list) and all(x is None or isinstance(x, (int, float))
                                                                            for x in r) for r in v)
                    for v in d["done"].values()):
                raise LoadError(f"{state}: damaged probe cache state; delete {self.dir} (the probe starts afresh)")
            if d.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"probe cache {self.dir} belongs to another model, probe set or settings; "
                    "delete it or pass another cache path"
                )
            self.done = d["done"]

    def _write(self) -> None:
        write_atomic(self.state, json.dumps({"fingerprint": self.fingerprint, "done": self.done}, sort_keys=True))

    def add(self, name: str, errors: np.ndarray) -> None:
        self.done[name] = [[None if math.isnan(x) else x for x in row] for row in errors.tolist()]
        if self.dir is not None:
            self._write()

    def get(self, name: str) -> np.ndarray | None:
        e = self.done.get(name)
        return None if e is None else np.array([[np.nan if x is None else x for x in r] for r in e], dtype=np.float64)

    def load_tensors(self, name: str) -> Any:
        """A finished part, or None (not cached yet). A damaged file (cut short, edited) is a
        cache miss: a warning names it, it is removed, and that part is computed again."""
        path = self.dir / name if self.dir is not None else None
        if path is None or not path.exists():
            return None
        try:
            return torch.load(path, weights_only=False)
        except Exception as e:  # noqa: BLE001 -- pickle, zip and torch errors of a damaged file
            warnings.warn(f"{path}: damaged probe cache file ({type(e).__name__}); removed, computing that part again",
                          stacklevel=2)
            path.unlink(missing_ok=True)
            return None

    def save_tensors(self, name: str, obj: Any) -> None:
        if self.dir is not None:
            with atomic_path(self.dir / name) as tmp:
                torch.save(obj, tmp)
