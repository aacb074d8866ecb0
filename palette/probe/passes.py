"""The fast probe's passes over the model: one forward per probe unit, K backward passes of random
Rademacher projections, and, through hooks on every target layer, each layer's per-sample weight
gradients (from its input and output gradient: the batch never mixes samples), handed to that
layer's fold as they come. The model is guarded: eval mode, frozen parameters, hooks removed and
every flag and `.grad` restored on the way out, also on an exception or KeyboardInterrupt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._interrupt import checkpoint, deferred
from ..palettize import untouched
from ..recipe import tied_layers


def per_sample_grad(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
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
    elif isinstance(padding, str):  # 'valid': none; 'same': what the conv itself pads, maybe unevenly
        pads = [(0, 0)] * (x.dim() - 2)
        if padding == "same":
            pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                    for d, k in zip(module.dilation, module.kernel_size)]
        x = nn.functional.pad(x, [p for left_right in reversed(pads) for p in left_right])
        padding = (0,) * (x.dim() - 2)
    wf = w.detach().float()
    out = []
    for s in range(b):
        gw = torch.ops.aten.convolution_backward(
            g[s : s + 1].float(), x[s : s + 1].float(), wf, None, list(module.stride), list(padding),
            list(module.dilation), False, [0] * (x.dim() - 2), module.groups, [False, True, False],
        )[1]
        out.append(gw.reshape(-1))
    return torch.stack(out)


class Recorder:
    """Forward hooks on target layers; each backward pass folds every layer's per-sample gradients
    at once with that layer's `fold` (gs -> a (b, width) block, and optionally a (b,) residual):
    a `Streamed` layer's inner products with its candidates, or a sketch (`ValueIndex.fold`, or
    the gradients themselves)."""

    def __init__(self, modules: dict[str, nn.Module], folds: dict[str, Any], importance: bool) -> None:
        self.folds = folds
        self.blocks: dict[str, dict[tuple[int, int], tuple]] = {n: {} for n in modules}
        self.importance = ({n: torch.zeros(m.weight.numel(), device=m.weight.device) for n, m in modules.items()}
                           if importance else None)
        self.leaves: list[torch.Tensor] = []
        self.calls: dict[str, int] = {}  # calls of each layer in this unit's forward
        self.pending: dict[str, list] = {}  # a repeated layer's gradient summed until all its calls are in
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
            self.calls[name] = self.calls.get(name, 0) + 1
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
        gs = per_sample_grad(module, x, g)
        if self.calls.get(name, 1) > 1:  # a layer called more than once (the denoiser at every sampler step):
            if name in self.pending:     # its gradient is the sum over the calls; folded once, when all are in
                self.pending[name][0] += gs
                self.pending[name][1] += 1
            else:
                self.pending[name] = [gs, 1, module]
            if self.pending[name][1] < self.calls[name]:
                return
            gs = self.pending.pop(name)[0]
        self._fold(name, module, gs)

    def flush(self) -> None:
        """Fold what repeated layers gathered in a pass where some of their calls got no gradient."""
        for name, (gs, _, module) in list(self.pending.items()):
            self._fold(name, module, gs)
        self.pending.clear()

    def _fold(self, name: str, module: nn.Module, gs: torch.Tensor) -> None:
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
        parts = [tuple(t.cpu() for t in blocks.pop(key, None) or fold.zeros(unit_batches[key[0]])) for key in keys]
        sample = torch.cat([torch.arange(offsets[u], offsets[u] + unit_batches[u]) for u, _ in keys])
        return tuple(torch.cat(p) for p in zip(*parts)), sample


def unit_generator(seed: int, unit: int) -> torch.Generator:
    """The CPU generator of a unit's random projections: a function of the seed and the unit's
    index alone, so a unit gets the same ones in any process, alone or with others."""
    return torch.Generator().manual_seed(seed * 1_000_003 + unit)


def run_passes(model, targets, units, folds, n_probes, seed, want_importance, progress):
    """Forward once per unit, K backward passes each, every layer's gradients folded by its fold.

    `units`: (index, unit) pairs, the index seeding the unit's projections (`unit_generator`).
    Returns {layer: (stacked blocks, sample of each row)} with samples counted over these units,
    per-sample peaks and sizes, and the importance (mean squared gradient) if asked."""
    with untouched(model, freeze=True) as hooks:
        rec = Recorder(targets, folds, want_importance)
        for name, m in targets.items():
            hooks.append(m.register_forward_hook(rec.hook(name), with_kwargs=True))
        modules = dict(model.named_modules())
        for first, aliases in tied_layers(model).items():  # a tied weight's gradient: every use adds up
            if first in targets:
                for a in aliases:
                    hooks.append(modules[a].register_forward_hook(rec.hook(first), with_kwargs=True))
        peaks, sizes, batches = [], [], []
        bar = tqdm(total=len(units) * n_probes, desc="probe passes", disable=not progress, leave=False)
        try:
            for u, (index, unit) in enumerate(units):
                rec.unit, rec.leaves, rec.calls = u, [], {}
                gen = unit_generator(seed, index)
                with torch.enable_grad():
                    out = unit(model)
                    b = out.shape[0]
                    rec.batch = b
                    batches.append(b)
                    flat = out.detach().reshape(b, -1)
                    peaks.append(flat.abs().amax(1).double().cpu())
                    sizes.append(torch.full((b,), flat.shape[1], dtype=torch.int64))
                    for k in range(n_probes):
                        rec.probe = k
                        v = (torch.randint(0, 2, out.shape, generator=gen) * 2 - 1).to(out.device, out.dtype)
                        if out.requires_grad and rec.leaves:
                            with deferred():  # Ctrl-C never lands inside autograd's engine
                                torch.autograd.grad((out * v).sum(), rec.leaves, retain_graph=k < n_probes - 1,
                                                    allow_unused=True)
                        rec.flush()
                        bar.update()
                        checkpoint()
                del out
        finally:
            bar.close()
        folded = {n: rec.rows(n, batches, n_probes) for n in targets}
        rows = sum(batches) * n_probes
        imp = {n: (t / rows).reshape(targets[n].weight.shape) for n, t in rec.importance.items()} if want_importance else None
    return folded, torch.cat(peaks).numpy(), torch.cat(sizes).numpy(), imp
