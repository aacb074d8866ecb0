"""Which layers of a model are palettization targets, and applying palettes to them.

A target is a `nn.Linear`, `nn.Conv1d` or `nn.Conv2d` (subclasses included) whose weight has at
least `min_numel` elements. The default, 2048, is coremltools' own `weight_threshold`: it keeps
every real layer of a UNet, text encoder or VAE decoder and leaves out only tiny ones (Apple's MBP
uses 1e5, which would skip whole small models). Layers are named by fully-qualified module name.

Weights are written in place with `copy_`, so storage shared with other views (the ANE rewrite's
1x1 convs) sees the same values; `keep_original` restores them, also on an exception or Ctrl-C.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .cluster import Palette, check_weight, fit_palettes_batch
from .spec import PaletteSpec

TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
DEFAULT_MIN_NUMEL = 2048
BATCH_NUMEL = 1 << 25  # weights clustered per parallel call: both cores busy, memory bounded

SpecMapping = Mapping[str, "PaletteSpec | None"]


def target_layers(
    model: nn.Module, min_numel: int = DEFAULT_MIN_NUMEL, types: tuple[type, ...] = TARGET_TYPES
) -> dict[str, nn.Module]:
    """Target layers by fully-qualified name, in module order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, types)
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.numel() >= min_numel
    }


def batches(names: list[str], sizes: list[int], limit: int = BATCH_NUMEL) -> Iterator[list[str]]:
    """Consecutive runs of names whose sizes add up to at most `limit` (at least one each)."""
    run: list[str] = []
    total = 0
    for name, size in zip(names, sizes):
        if run and total + size > limit:
            yield run
            run, total = [], 0
        run.append(name)
        total += size
    if run:
        yield run


def resolve_specs(
    model: nn.Module,
    spec_or_mapping: PaletteSpec | SpecMapping,
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> dict[str, PaletteSpec]:
    """{layer name: spec} for the target layers a spec or a mapping selects.

    A mapping's keys are fully-qualified names or regular expressions (full match), tried in
    order, an exact name first; a value of None keeps that layer at 16 bits. A key that selects
    no target layer is an error, so that a typo never silently leaves a layer uncompressed.
    """
    targets = target_layers(model, min_numel)
    if isinstance(spec_or_mapping, PaletteSpec):
        return {name: spec_or_mapping for name in targets}
    if not isinstance(spec_or_mapping, Mapping):
        raise ValueError(
            f"expected a PaletteSpec or a mapping of layer names to specs, "
            f"got {type(spec_or_mapping).__name__}"
        )
    chosen: dict[str, PaletteSpec | None] = {}
    unused = []
    patterns = []
    for key, spec in spec_or_mapping.items():
        if spec is not None and not isinstance(spec, PaletteSpec):
            raise ValueError(f"{key!r}: expected a PaletteSpec or None, got {type(spec).__name__}")
        if key in targets:
            chosen.setdefault(key, spec)
            continue
        try:
            patterns.append((key, re.compile(key), spec))
        except re.error:
            unused.append(key)
    for key, rx, spec in patterns:
        hits = [n for n in targets if rx.fullmatch(n)]
        if not hits:
            unused.append(key)
        for n in hits:
            chosen.setdefault(n, spec)
    if unused:
        sample = ", ".join(list(targets)[:5])
        raise ValueError(
            f"{len(unused)} key(s) match no target layer of {type(model).__name__}: {unused[:10]}. "
            f"Target layers are Linear/Conv1d/Conv2d with >= {min_numel} weights, "
            f"named like: {sample}"
        )
    return {n: s for n, s in chosen.items() if s is not None}


def palettize(
    model: nn.Module,
    spec_or_mapping: PaletteSpec | SpecMapping,
    *,
    min_numel: int = DEFAULT_MIN_NUMEL,
    importance: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Palette]:
    """Palettize target layers in place; returns their palettes by layer name.

    Every weight is checked, and every palette fitted, before any weight is written: a bad layer
    raises with the model untouched.
    """
    specs = resolve_specs(model, spec_or_mapping, min_numel)
    modules = dict(model.named_modules())
    for name in specs:
        check_weight(modules[name].weight, name)
        specs[name].n_groups(modules[name].weight.shape[0], name)
    palettes = {}
    names = list(specs)
    with tqdm(total=len(names), desc="palettize", disable=not progress, leave=False) as bar:
        for batch in batches(names, [modules[n].weight.numel() for n in names]):
            items = [
                (modules[n].weight, [specs[n]], importance.get(n) if importance else None)
                for n in batch
            ]
            for n, (pal,) in zip(batch, fit_palettes_batch(items, seed=seed, names=batch)):
                palettes[n] = pal
            bar.update(len(batch))
    apply_palettes(model, palettes)
    return palettes


def apply_palettes(model: nn.Module, palettes: Mapping[str, Palette]) -> None:
    """Write already-fitted palettes into the model's weights, in place."""
    modules = dict(model.named_modules())
    missing = [n for n in palettes if n not in modules]
    if missing:
        raise ValueError(f"palettes name layers the model does not have: {missing[:10]}")
    for name, pal in palettes.items():
        w = modules[name].weight
        if w.shape[0] != pal.shape[0] or w.numel() != math.prod(pal.shape):
            raise ValueError(f"{name}: palette shape {pal.shape} != weight shape {tuple(w.shape)}")
    with torch.no_grad():
        for name, pal in palettes.items():
            w = modules[name].weight
            w.copy_(pal.dequantize().reshape(w.shape).to(w.dtype))


@contextmanager
def keep_original(model: nn.Module, names: list[str] | None = None) -> Iterator[None]:
    """Restore the weights of `names` (default: every target layer) on exit, whatever happens.

    Only those weights are copied, never the whole model.
    """
    modules = dict(model.named_modules())
    names = list(target_layers(model)) if names is None else names
    saved = {n: modules[n].weight.detach().clone() for n in names}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                modules[n].weight.copy_(w)
