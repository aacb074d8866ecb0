"""Applying a recipe to a model, in place and reversibly; the palettes a model carries.

`palettize(model, plan)` fits the plan's palettes (`Recipe.palettes`) and writes them: each
weight becomes LUT[indices] (times its scale), in place with `copy_` so that storage shared with
other views (the ANE rewrite's 1x1 convs) sees the same values, and each palettized layer carries
its palette as coremltools' compression metadata (`palette.metadata`), so that any Core ML
conversion emits it exactly. `keep_original` restores weights and metadata, also on an exception
or Ctrl-C.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
import torch
from torch import nn

from . import metadata
from ._checks import check_loaded
from .cluster import Palette, check_weight
from .recipe import DEFAULT_MIN_NUMEL, PaletteSpec, Recipe, SpecMapping, as_recipe, target_layers, tied_layers


def palettize(
    model: nn.Module,
    plan: Recipe | PaletteSpec | SpecMapping,
    *,
    min_numel: int = DEFAULT_MIN_NUMEL,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Palette]:
    """Palettize `model` in place as `plan` says (a Recipe, or a spec or mapping for
    `Recipe.from_specs(model, plan, min_numel=, seed=)`); returns the palettes by layer name.

    Every weight is checked, and every palette fitted, before any weight is written: a bad layer
    raises with the model untouched. Each palettized layer carries its palette afterwards
    (`palettes_of`), so a plain `ct.convert` of the model emits it. A layer that already carries a
    palette of the same layout keeps it exactly: palettizing twice changes nothing.
    """
    recipe = as_recipe(model, plan, min_numel=min_numel, seed=seed)
    modules = dict(model.named_modules())
    for name in recipe.palettized:
        if name in modules:
            check_weight(modules[name].weight, name)
    palettes = recipe.palettes(model, progress=progress)
    apply_palettes(model, palettes)
    return palettes


def apply_recipe(model: nn.Module, recipe: Recipe) -> dict[str, Palette]:
    """`palettize(model, recipe)` for a Recipe (names and shapes checked first)."""
    if not isinstance(recipe, Recipe):
        raise ValueError(f"expected a Recipe (Recipe.load(path)), got {type(recipe).__name__}")
    return palettize(model, recipe, progress=False)


def apply_palettes(model: nn.Module, palettes: Mapping[str, Palette]) -> None:
    """Write already-fitted palettes into the model's weights, in place, each layer carrying its
    palette's metadata: the second half of `palettize`, for palettes fitted elsewhere."""
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


def planned_palettes(model: nn.Module, recipe: Recipe | None, *, progress: bool = False) -> dict[str, Palette]:
    """What an exporter writes: the recipe's palettes for `model`, or with no recipe the palettes
    the model carries."""
    if recipe is None:
        return palettes_of(model)
    return as_recipe(model, recipe).palettes(model, progress=progress)


def strip_palettes(model: nn.Module) -> int:
    """Drop every palette the model carries (its weights stay as they are, dense): a conversion
    then stores them as fp16. Returns how many layers carried one."""
    carried = [m for m in model.modules() if metadata.carries(m)]
    for m in model.modules():
        metadata.detach(m)  # the root's metadata version too
    return len(carried)


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


@contextmanager
def untouched(model: nn.Module, *, freeze: bool = False) -> Iterator[list]:
    """The model left exactly as it was, whatever happens in the block (an exception or Ctrl-C
    included): the block runs it in eval mode (BatchNorm uses its running statistics, Dropout
    does nothing, so the same call gives the same result), and, with `freeze`, with
    requires_grad off everywhere. On exit every module's training flag, every parameter's
    requires_grad and `.grad`, and every buffer's value (BatchNorm running statistics and counts)
    are restored, and the hooks put in the yielded list are removed.

    Weights are not copied (use `keep_original` for what the block palettizes); buffers are, and
    they are small."""
    check_loaded(model)
    training = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    buffers = [(m, k, b, b.detach().clone()) for m in model.modules() for k, b in m._buffers.items()
               if b is not None and not k.startswith(metadata.PREFIX)]
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
        with torch.no_grad():
            for m, k, b, saved in buffers:
                if m._buffers.get(k) is not b:
                    m._buffers[k] = b
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)


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


@contextmanager
def persistent_palettes(model: nn.Module) -> Iterator[None]:
    """The palettes the model carries in its `state_dict` for the duration of the block, for
    `torch.export`: an ExportedProgram keeps persistent buffers only, and coremltools reads the
    compression metadata from it (`torch.jit.trace` needs nothing of the kind)."""
    made = [(m, k) for m in model.modules() for k in metadata.keys(m) if k in m._non_persistent_buffers_set]
    for m, k in made:
        m._non_persistent_buffers_set.discard(k)
    try:
        yield
    finally:
        for m, k in made:
            if k in m._buffers:
                m._non_persistent_buffers_set.add(k)


@contextmanager
def palettized(model: nn.Module, palettes: Mapping[str, Palette]) -> Iterator[None]:
    """The model carrying exactly `palettes` for the duration of the block (palettes it carried on
    other layers are put aside); weights and metadata restored on exit, whatever happens."""
    modules = dict(model.named_modules())
    carrying = [n for n, m in modules.items() if metadata.carries(m)]
    with keep_original(model, sorted(set(carrying) | set(palettes))):
        for n in carrying:
            metadata.detach(modules[n])
        apply_palettes(model, palettes)
        yield


@contextmanager
def palettized_per_call(model: nn.Module, palettes: Mapping[str, Palette]) -> Iterator[None]:
    """The model computing with `palettes` for the duration of the block, each layer's weight
    palettized only while that layer runs (and restored right after): one layer's copy beyond the
    model instead of a copy of every palettized weight (`palettized`), for measuring outputs of a
    large model. Layers sharing a weight (`tied_layers`) compute with its palette too. Metadata is
    not attached; every weight is back on exit, whatever happens."""
    modules = dict(model.named_modules())
    users = {n: [n] for n in palettes}
    for first, aliases in tied_layers(model).items():
        if first in users:
            users[first] += aliases
    backups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by module: (weight, its original values)
    hooks = []

    def pre(pal: Palette):
        def hook(module: nn.Module, args) -> None:
            w = module.weight
            backups[id(module)] = (w, w.detach().clone())
            with torch.no_grad():
                w.copy_(metadata.exact_weight(pal).reshape(w.shape).to(w.device, w.dtype))
        return hook

    def post(module: nn.Module, args, output) -> None:
        w, original = backups.pop(id(module))
        with torch.no_grad():
            w.copy_(original)

    try:
        for name, pal in palettes.items():
            for user in users[name]:
                hooks.append(modules[user].register_forward_pre_hook(pre(pal)))
                hooks.append(modules[user].register_forward_hook(post))
        yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for w, original in backups.values():
                w.copy_(original)
