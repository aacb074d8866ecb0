"""Before the heavy work: an estimate of the fast probe's peak memory and time, from the model, the
candidates and one measured forward pass, checked against what the machine (or the device) has.

Peak = the model (already resident) + what one unit's forward holds for the backward passes
(measured: saved activations and target layers' inputs) + the backward's working set (twice the
largest saved tensor: its gradient and the op's temporaries) + every layer's compact candidates
(exact) + the largest layer's transients (its per-sample gradients and their folds). Time = one
unit's forward (measured) x units x (1 + K x the backward factor) + clustering (from the weight
count).
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..spec import PaletteSpec
from .inputs import ProbeSet
from ._binsum import MIN_TASKS
from .sketch import is_value_function

GB = 1e9
BACKWARD_FACTOR = 3.0  # a pass (input gradients, per-sample weight gradients, folds) / a forward (SD 1.5: 17.6 s / 6.0 s)
CLUSTER_NS = {"per_tensor": 15.0, "per_grouped_channel": 100.0}  # all six bit-widths, per weight
OVERHEAD = 600_000_000  # the interpreter, torch, numba and their arenas
N_KEYS = 1 << 16


@dataclass(frozen=True)
class ProbeEstimate:
    """What the fast probe is expected to need (bytes, seconds) and what there is."""

    weights: int
    activations: int
    backward: int  # the backward's working set beyond the saved activations
    candidates: int
    transient: int
    forward_seconds: float
    seconds: float
    available: int  # free memory beyond what the model already holds
    device: str

    @property
    def needed(self) -> int:
        """Memory the probe adds to the resident model."""
        return self.activations + self.backward + self.candidates + self.transient + OVERHEAD

    @property
    def peak(self) -> int:
        return self.weights + self.needed

    def summary(self) -> str:
        return (
            f"probe estimate on {self.device}: peak {self.peak / GB:.1f} GB (model {self.weights / GB:.1f}, "
            f"activations {self.activations / GB:.2f}, backward {self.backward / GB:.2f}, "
            f"candidates {self.candidates / GB:.2f}, "
            f"largest layer {self.transient / GB:.2f}); about {self.seconds / 60:.1f} min "
            f"(one forward {self.forward_seconds:.1f} s); {self.available / GB:.1f} GB available"
        )

    def check(self) -> None:
        """A ValueError naming options that fit when the probe would not fit in memory."""
        if self.needed <= self.available:
            return
        raise ValueError(
            f"the probe needs about {self.needed / GB:.1f} GB beyond the model (activations "
            f"{self.activations / GB:.1f}, backward {self.backward / GB:.1f}, candidates "
            f"{self.candidates / GB:.1f}, largest layer "
            f"{self.transient / GB:.1f}, overhead {OVERHEAD / GB:.1f}) and {self.device} has "
            f"{self.available / GB:.1f} GB free. Options that need less: one sample per batch "
            "(make_probe_set(..., batch_size=1), CLI --batch-size 1), per_tensor candidates only "
            "(Candidates(granularities=('per_tensor',)), --granularity per_tensor), a lower probe "
            "resolution (make_probe_set(..., sample_size=...), --sample-size), fewer samples, or a "
            "device with more memory (model.to('cuda'), --device cuda)"
        )


def release_freed() -> None:
    """Hand the memory freed since the last call back to the operating system (glibc's
    `malloc_trim`): what clustering and a unit's passes free otherwise stays in the allocator's
    arenas and counts in the process's resident size. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: the CUDA allocator's free bytes, else the machine's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):  # not Linux: no check
        return 1 << 62


def activation_bytes(model: nn.Module, probe: ProbeSet, targets: Mapping[str, nn.Module]) -> tuple[int, int, float]:
    """(bytes held for the backward passes, the largest of those storages, seconds) of the first
    unit's forward as the probe runs it: the parameters frozen, every target layer's output a graph
    leaf; what autograd saves and the target layers' inputs (the per-sample weight gradients need
    them), each storage once."""
    from ..palettize import untouched

    sizes: dict[tuple, int] = {}
    kept: list[torch.Tensor] = []  # saved tensors live here, not in the graph: no reference cycle

    def count(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        sizes[(storage.data_ptr(), t.device)] = storage.nbytes()

    def pack(t: torch.Tensor) -> int:
        count(t)
        kept.append(t)
        return len(kept) - 1

    def unpack(i: int) -> torch.Tensor:
        return kept[i]

    def leaf(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor):
            count(x)
            kept.append(x)
        if isinstance(output, torch.Tensor) and not output.requires_grad:
            output.requires_grad_(True)

    with untouched(model, freeze=True) as hooks:
        hooks.extend(m.register_forward_hook(leaf, with_kwargs=True) for m in targets.values())
        t0 = time.perf_counter()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = probe.units[0](model)
        seconds = time.perf_counter() - t0
        del out
        kept.clear()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = [n for (ptr, _), n in sizes.items() if ptr not in params]
    return sum(held), max(held, default=0), seconds


def candidate_bytes(shape: tuple[int, ...], specs: list[PaletteSpec]) -> int:
    """Bytes of one layer's candidates in the passes (`sketch.Streamed`)."""
    numel = math.prod(shape)
    total = 0
    compact = [s for s in specs if is_value_function(s)]
    if compact:
        total += 8 * N_KEYS + 8 * min(numel, N_KEYS)  # rank table and distinct values
    for s in compact:
        total += 8 * s.n_groups(shape[0]) * (2 * s.n_entries + 1)
    for s in specs:
        if not is_value_function(s):
            total += numel // s.cluster_dim + s.nbytes(shape)
    return total


def transient_bytes(shape: tuple[int, ...], batch: int) -> int:
    """The largest working set of one layer's backward hook (`sketch.Thresholds.folded`): its
    output gradient and per-sample weight gradients (float32), the weight's fp16 bit patterns, and
    per sample the sums per distinct value of the tasks' slices (few groups) or of the lanes'
    scratches and their sums over all groups (many), float64."""
    numel = math.prod(shape)
    tasks = 2 * MIN_TASKS + torch.get_num_threads()
    return 4 * numel * (batch + 1) + 2 * numel + 8 * batch * tasks * min(numel, N_KEYS)


def estimate(
    model: nn.Module,
    probe: ProbeSet,
    targets: Mapping[str, nn.Module],
    ok_specs: Mapping[str, list[PaletteSpec]],
    n_probes: int,
    units: int,
) -> ProbeEstimate:
    """The fast probe's estimate for these layers and candidates (runs one forward pass)."""
    device = next(model.parameters()).device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    activations, largest, forward_s = activation_bytes(model, probe, targets)
    shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
    cands = sum(candidate_bytes(shapes[n], ok_specs[n]) for n in targets)
    batch = max(1, probe.batch_size)
    transient = max(transient_bytes(shapes[n], batch) for n in targets)
    grans = {s.granularity for specs in ok_specs.values() for s in specs}
    numel = sum(math.prod(s) for s in shapes.values())
    cluster_s = sum(CLUSTER_NS[g] for g in grans) * numel * 1e-9
    seconds = forward_s * units * (1 + BACKWARD_FACTOR * n_probes) + cluster_s
    return ProbeEstimate(weights, activations, 2 * largest, cands, transient, forward_s, seconds, available_bytes(device),
                         str(device))
