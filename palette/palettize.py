"""Which layers of a model are palettization targets, and applying palettes to them.

A target is a `nn.Linear`, `nn.Conv1d` or `nn.Conv2d` (subclasses included) whose weight has at
least `min_numel` elements. The default, 2048, is coremltools' own `weight_threshold`: it keeps
every real layer of a UNet, text encoder or VAE decoder and leaves out only tiny ones (Apple's MBP
uses 1e5, which would skip whole small models). Layers are named by fully-qualified module name.

Weights are written in place with `copy_`, so storage shared with other views (the ANE rewrite's
1x1 convs) sees the same values, and each palettized layer carries its palette as coremltools'
compression metadata (`palette.metadata`), so that any Core ML conversion emits it exactly;
`keep_original` restores weights and metadata, also on an exception or Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from . import metadata
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
    raises with the model untouched. Each palettized layer carries its palette afterwards
    (`palettes_of`), so a plain `ct.convert` of the model emits it. A layer that already carries
    a palette of the same layout keeps it exactly (palettizing twice changes nothing); one that
    carries another is fitted again from its palettized weights, with a warning.
    """
    specs = resolve_specs(model, spec_or_mapping, min_numel)
    modules = dict(model.named_modules())
    for name in specs:
        check_weight(modules[name].weight, name)
        specs[name].n_groups(modules[name].weight.shape[0], name)
    palettes, refit = {}, []
    for name, spec in specs.items():
        m = modules[name]
        if metadata.carries(m) and not (importance and name in importance):
            have = metadata.spec_of(m, name)
            if same_layout(have, spec, m.weight.shape[0]):
                palettes[name] = dataclasses.replace(metadata.read(m, name), spec=spec)
            else:
                refit.append(f"{name} ({have.label} -> {spec.label})")
    if refit:
        warnings.warn(
            f"{len(refit)} layer(s) already carry other palettes and are fitted again from their "
            f"palettized weights, not the original ones: {', '.join(refit[:5])}"
            f"{' ...' if len(refit) > 5 else ''}; palettize the original model for the best palettes",
            stacklevel=2,
        )
    names = [n for n in specs if n not in palettes]
    with tqdm(total=len(names), desc="palettize", disable=not progress, leave=False) as bar:
        for batch in batches(names, [modules[n].weight.numel() for n in names]):
            items = [
                (modules[n].weight, [specs[n]], importance.get(n) if importance else None)
                for n in batch
            ]
            for n, (pal,) in zip(batch, fit_palettes_batch(items, seed=seed, names=batch)):
                palettes[n] = pal
            bar.update(len(batch))
    palettes = {n: palettes[n] for n in specs}
    apply_palettes(model, palettes)
    return palettes


def same_layout(a: PaletteSpec, b: PaletteSpec, out_channels: int) -> bool:
    """Whether two specs store a weight of `out_channels` rows alike (same LUTs, vectors, scale)."""
    return (a.nbits, a.cluster_dim, a.per_channel_scale, a.n_groups(out_channels)) == (
        b.nbits, b.cluster_dim, b.per_channel_scale, b.n_groups(out_channels))


def apply_palettes(model: nn.Module, palettes: Mapping[str, Palette]) -> None:
    """Write already-fitted palettes into the model's weights, in place, each layer carrying its
    palette's metadata (`palette.metadata`)."""
    modules = dict(model.named_modules())
    missing = [n for n in palettes if n not in modules]
    if missing:
        raise ValueError(f"palettes name layers the model does not have: {missing[:10]}")
    for name, pal in palettes.items():
        w = modules[name].weight
        if w.shape[0] != pal.shape[0] or w.numel() != math.prod(pal.shape):
            raise ValueError(f"{name}: palette shape {pal.shape} != weight shape {tuple(w.shape)}")
    for name, pal in palettes.items():
        metadata.attach(modules[name], pal)
    if palettes:
        metadata.mark_root(model)


def palettes_of(model: nn.Module) -> dict[str, Palette]:
    """The palettes the model's layers carry, by layer name in module order (empty if none).

    A ValueError names any layer whose weight was changed after palettizing (its metadata is
    stale) or whose metadata palette cannot read."""
    return {n: metadata.read(m, n) for n, m in model.named_modules() if metadata.carries(m)}


def dense_lookalikes(model: nn.Module, skip: Collection[str] = ()) -> list[tuple[str, int, int]]:
    """(name, distinct values, fp16 bytes) of the target layers outside `skip` that carry no
    palette yet hold 2 to 256 distinct fp16 values: palettized by another tool, or edited."""
    found = []
    for name, m in target_layers(model).items():
        if name in skip or metadata.carries(m):
            continue
        keys = m.weight.detach().to(torch.float16).reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
        distinct = int((torch.bincount(keys, minlength=1 << 16) > 0).sum())
        if 2 <= distinct <= 256:
            found.append((name, distinct, 2 * m.weight.numel()))
    return found


def strip_palettes(model: nn.Module) -> int:
    """Drop every palette the model carries (its weights stay as they are, dense): a conversion
    then stores them as fp16. Returns how many layers carried one."""
    carried = [m for m in model.modules() if metadata.carries(m)]
    for m in model.modules():
        metadata.detach(m)  # the root's metadata version too
    return len(carried)


@contextmanager
def keep_original(model: nn.Module, names: list[str] | None = None) -> Iterator[None]:
    """Restore the weights of `names` (default: every target layer) and the palettes they carry
    on exit, whatever happens.

    Only those weights are copied, never the whole model.
    """
    modules = dict(model.named_modules())
    names = list(target_layers(model)) if names is None else names
    saved = {n: modules[n].weight.detach().clone() for n in names}
    carried = {n: {k: modules[n]._buffers[k] for k in metadata.keys(modules[n])} for n in names}
    root = model._buffers.get(metadata.VERSION_KEY)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                modules[n].weight.copy_(w)
        for n, bufs in carried.items():
            metadata.detach(modules[n])
            for k, v in bufs.items():
                modules[n].register_buffer(k, v, persistent=False)
        model._buffers.pop(metadata.VERSION_KEY, None)
        model._non_persistent_buffers_set.discard(metadata.VERSION_KEY)
        if root is not None:
            model.register_buffer(metadata.VERSION_KEY, root, persistent=False)
