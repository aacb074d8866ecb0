"""How many pieces a model's weights need under a per-file size limit, planned from layer bytes in
the order a forward pass uses them (iOS maps each model file under a limit, about 1 GB in
practice). `palette.export.chunk` cuts the converted Core ML program itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .cluster import Palette
from .recipe import PaletteSpec, Recipe, SpecMapping, as_recipe


def chunks_needed(layer_bytes: Sequence[tuple[str, int]], max_chunk_bytes: int) -> int:
    """Fewest contiguous chunks of `layer_bytes` (name, bytes; in the order a forward pass uses
    them) with every chunk's sum at most `max_chunk_bytes` (greedy fill, which is optimal).

    Raises ValueError naming the largest entry if it alone exceeds the limit.
    """
    check_limit(max_chunk_bytes)
    if not layer_bytes:
        return 1
    name, largest = max(layer_bytes, key=lambda nb: nb[1])
    if largest > max_chunk_bytes:
        raise ValueError(too_big(name, largest, max_chunk_bytes))
    n, filled = 1, 0
    for _, b in layer_bytes:
        if filled + b > max_chunk_bytes:
            n, filled = n + 1, 0
        filled += b
    return n


def layer_bytes_in_order(
    model: nn.Module, plan: Recipe | PaletteSpec | SpecMapping | None = None, inputs: Any = None
) -> list[tuple[str, int]]:
    """[(parameter name, stored bytes)] in the order a forward pass first uses each module.

    A weight the plan (a Recipe, or a spec or mapping: `Recipe.from_specs`) palettizes costs
    `spec.nbytes(shape)`; every other parameter 2 bytes a value. `inputs` (example tensors, a tuple
    of them, or a dict of keyword tensors) runs one forward pass with hooks to get the order of use;
    without it, module registration order stands in (diffusers registers UNet blocks in execution
    order). Feed the result to `chunks_needed`.
    """
    layers = as_recipe(model, plan).layers if plan is not None else {}
    modules = dict(model.named_modules())
    order = _call_order(model, inputs) if inputs is not None else []
    seen_modules = set(order)
    order += [n for n in modules if n not in seen_modules]
    out: list[tuple[str, int]] = []
    seen: set[int] = set()
    for mname in order:
        for pname, p in modules[mname].named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            spec = layers.get(mname) if pname == "weight" else None
            nbytes = 2 * p.numel() if spec is None else spec.nbytes(tuple(p.shape), mname)
            out.append((f"{mname}.{pname}" if mname else pname, nbytes))
    return out


def _call_order(model: nn.Module, inputs: Any) -> list[str]:
    """Names of the modules owning parameters, in the order a forward pass first calls them."""
    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if next(m.parameters(recurse=False), None) is not None:
            handles.append(m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name)))
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                model(**inputs)
            else:
                model(*((inputs,) if isinstance(inputs, torch.Tensor) else inputs))
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def check_chunk_limit(model: nn.Module, palettes: Mapping[str, Palette], max_chunk_bytes: int) -> None:
    """Before converting: raise ValueError if one weight of `model` alone is over the limit."""
    check_limit(max_chunk_bytes)
    sizes = {f"{n}.weight": p.nbytes for n, p in palettes.items()}
    for name, p in model.named_parameters():
        sizes.setdefault(name, 2 * p.numel())
    name = max(sizes, key=sizes.get, default=None)
    if name is not None and sizes[name] > max_chunk_bytes:
        raise ValueError(too_big(name, sizes[name], max_chunk_bytes))


def check_limit(max_chunk_bytes: Any) -> None:
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, (int, np.integer)) or max_chunk_bytes <= 0:
        raise ValueError(f"max_chunk_bytes must be a positive int (bytes), got {max_chunk_bytes!r}")


def too_big(name: str, nbytes: int, limit: int) -> str:
    return (
        f"the weight {name} alone stores {nbytes:,} B, more than max_chunk_bytes={limit:,} B: no split "
        "can fit it; raise the limit or palettize that layer to fewer bits"
    )
