"""The exhaustive estimator (Apple MBP style): palettize one layer at one spec, run the probe set,
measure the per-sample MSE against the unmodified model's outputs, restore that layer.
1 + layers x specs forward passes. The model is never copied: one layer at a time is written and
restored in a `finally`."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import metadata
from ..cluster import fit_palettes
from ..palettize import keep_original, untouched
from ..spec import PaletteSpec
from .cache import Cache
from .inputs import ProbeSet
from .measure import outputs, per_sample_mse
from .shard import Shard


def probe_exhaustive(
    model: nn.Module,
    targets: dict[str, nn.Module],
    probe: ProbeSet,
    cand: list[PaletteSpec],
    applicable: dict[str, list[bool]],
    store: Cache,
    seed: int,
    progress: bool,
    shard: Shard,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    """(errors per layer, per-sample peaks, per-sample sizes, clustering seconds); each rank of
    `shard` measures its share of the layers."""
    errors: dict[str, np.ndarray] = {}
    cluster_s = 0.0
    with untouched(model):
        refs = outputs(model, probe)
        peak = torch.cat([r.reshape(r.shape[0], -1).abs().amax(1).double() for r in refs]).cpu().numpy()
        size = np.concatenate([np.full(r.shape[0], r[0].numel(), dtype=np.int64) for r in refs])
        for _, name in tqdm(shard.mine(list(targets)), desc="exhaustive", disable=not progress, leave=False):
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
                        w = metadata.exact_weight(next(pals)).reshape(module.weight.shape)
                        module.weight.copy_(w.to(module.weight.dtype))
                        err[i] = per_sample_mse(outputs(model, probe), refs)
            errors[name] = err
            store.add(name, err)
    if shard.world > 1:
        parts = shard.gather((errors, cluster_s))
        errors = {n: e for part, _ in parts for n, e in part.items()}
        cluster_s = sum(c for _, c in parts)
    return {n: errors[n] for n in targets}, peak, size, cluster_s
