"""`Recipe`: the one plan that passes between palette's stages -- which layers are targets and the
palettization spec of each -- with its exact size, its predicted PSNR, and a checked JSON file.

A recipe names layers by fully-qualified module name and records each one's weight shape, so it
applies to any model of the same architecture (a fine-tune included) and refuses one whose names
or shapes differ. `Recipe.from_specs` builds one from a spec or a mapping, as torchao's
`FqnToConfig` and coremltools' `OptimizationConfig` do (exact names first, then regular
expressions in order, then module types); `Recipe.palettes` fits its palettes (the one loop that
does); `palettize`, `measure` and the exporters take a Recipe. It also converts to and from Apple
ml-stable-diffusion's mixed-bit pre-analysis JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import metadata
from ._jsonio import (LoadError, _short, check_header, dict_field, field_of, float_field, int_field, list_field,
                      plain, read_json, str_field, write_atomic)
from ._version import __version__
from .cluster import Palette, fit_palettes_batch, palette_from_lut
from .spec import DEFAULT_GROUP_SIZE, GRANULARITIES, NBITS, PaletteSpec

FORMAT = "palette.recipe"
VERSION = 1
APPLE_NBITS = (1, 2, 4, 6, 8)  # what ml-stable-diffusion's MBP flow accepts (16: keep fp16)
APPLE_MIN_NUMEL = 100_001  # its pre-analysis and apply step palettize weights above 1e5 elements only
TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
# coremltools' own `weight_threshold`: every real layer of a UNet, text encoder or VAE decoder, only
# tiny ones left out (Apple's MBP uses 1e5, which would skip whole small models).
DEFAULT_MIN_NUMEL = 2048
BATCH_NUMEL = 1 << 25  # weights clustered per parallel call: both cores busy, memory bounded

if TYPE_CHECKING:
    from .recipe_diff import RecipeDiff

SpecMapping = Mapping[Any, "PaletteSpec | None"]  # keys: layer names, regular expressions, module types


def _weighted(model: nn.Module, types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, types) and isinstance(getattr(m, "weight", None), torch.Tensor)]


def target_layers(
    model: nn.Module, min_numel: int = DEFAULT_MIN_NUMEL, types: tuple[type, ...] = TARGET_TYPES
) -> dict[str, nn.Module]:
    """Target layers by fully-qualified name, in module order: `nn.Linear`, `nn.Conv1d` and
    `nn.Conv2d` (subclasses included) whose weight has at least `min_numel` elements.

    A weight tied to several layers (one Parameter used by two modules) is one weight with one
    palette: it is listed once, under the first layer using it (`tied_layers` gives the others)."""
    seen: set[int] = set()
    out = {}
    for name, m in _weighted(model, types):
        if id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        if m.weight.numel() >= min_numel:
            out[name] = m
    return out


def tied_layers(model: nn.Module, types: tuple[type, ...] = TARGET_TYPES) -> dict[str, list[str]]:
    """{first layer: [the other layers sharing its weight Parameter]} for every tied weight."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, m in _weighted(model, types):
        key = id(m.weight)
        if key in first:
            out.setdefault(first[key], []).append(name)
        else:
            first[key] = name
    return out


def _alias_map(model: nn.Module) -> dict[str, str]:
    return {a: first for first, aliases in tied_layers(model).items() for a in aliases}


@dataclass(frozen=True)
class Candidates:
    """Which layers compete for bits and which specs each may take: `specs` if given, else every
    `nbits` x `granularities` (grouped by `group_size` output channels). A spec that does not fit a
    layer's shape is left out for that layer."""

    nbits: tuple[int, ...] = NBITS
    granularities: tuple[str, ...] = GRANULARITIES
    group_size: int = DEFAULT_GROUP_SIZE
    specs: tuple[PaletteSpec, ...] = ()
    min_numel: int = DEFAULT_MIN_NUMEL
    types: tuple[type, ...] = TARGET_TYPES

    def spec_list(self) -> list[PaletteSpec]:
        if self.specs:
            out = list(dict.fromkeys(self.specs))
            for s in out:
                if not isinstance(s, PaletteSpec):
                    raise ValueError(f"specs must be PaletteSpec objects, got {type(s).__name__}")
            return out
        for b in self.nbits:
            if b not in NBITS:
                raise ValueError(f"nbits must be among {NBITS}, got {b!r}")
        out = [PaletteSpec(nbits=b, granularity=g, group_size=self.group_size if g == "per_grouped_channel" else None)
               for g in self.granularities for b in self.nbits]
        if not out:
            raise ValueError("no candidate specs")
        return out

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The model's target layers under these candidates."""
        return target_layers(model, self.min_numel, self.types)


def fixed_bytes(model: nn.Module, targets: Mapping[str, nn.Module]) -> int:
    """Bytes of every parameter that is not a target weight, stored at 16 bits."""
    target_weights = {id(m.weight) for m in targets.values()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in target_weights:
            seen.add(id(p))
            total += 2 * p.numel()
    return total


def layer_bytes(spec: PaletteSpec | None, shape: tuple[int, ...]) -> int:
    """Stored bytes of one target weight: its palette, or 16 bits a weight when kept."""
    return 2 * math.prod(shape) if spec is None else spec.nbytes(shape)


def batches(names: Sequence[str], sizes: Sequence[int], limit: int = BATCH_NUMEL) -> Iterator[list[str]]:
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
    """{layer name: spec} for the target layers a spec or a mapping selects, in module order.

    A mapping's keys are fully-qualified names, regular expressions (full match) or module types;
    an exact name wins, then the first matching expression in order, then the most specific type.
    A value of None keeps that layer at 16 bits. An exact name may name a Linear/Conv layer below
    `min_numel`. A key that selects no layer is an error, so that a typo never silently leaves a
    layer uncompressed.
    """
    targets = target_layers(model, min_numel)
    if isinstance(spec_or_mapping, PaletteSpec):
        return {name: spec_or_mapping for name in targets}
    if not isinstance(spec_or_mapping, Mapping):
        raise ValueError(
            f"expected a PaletteSpec or a mapping of layer names, patterns or module types to specs, "
            f"got {type(spec_or_mapping).__name__}"
        )
    every = target_layers(model, 0)
    alias = _alias_map(model)
    asked: dict[str, tuple[str, PaletteSpec | None]] = {}  # per weight, (name, spec) first asked

    def ask(name: str, spec: PaletteSpec | None) -> None:
        """One weight, one palette: a tied weight asked two different specs is an error."""
        first = alias.get(name, name)
        if first in asked and asked[first][1] != spec and asked[first][0] != name:
            other, prev = asked[first]
            raise ValueError(
                f"{other} and {name} share one weight (tied), which takes one palette, but are asked "
                f"{'16 bits' if prev is None else prev.label} and {'16 bits' if spec is None else spec.label}; "
                "give both the same spec"
            )
        asked.setdefault(first, (name, spec))

    exact: dict[str, PaletteSpec | None] = {}
    patterns: list[tuple[str, re.Pattern, PaletteSpec | None]] = []
    types: list[tuple[type, PaletteSpec | None]] = []
    unused = []
    for key, spec in spec_or_mapping.items():
        if spec is not None and not isinstance(spec, PaletteSpec):
            raise ValueError(f"{key!r}: expected a PaletteSpec or None, got {type(spec).__name__}")
        if isinstance(key, type) and issubclass(key, nn.Module):
            types.append((key, spec))
        elif not isinstance(key, str):
            raise ValueError(f"mapping keys are layer names, patterns or module types, got {key!r}")
        elif key in every or key in alias:
            ask(key, spec)
            exact[alias.get(key, key)] = spec
        else:
            try:
                patterns.append((key, re.compile(key), spec))
            except re.error:
                unused.append(key)
    chosen = dict(exact)
    for key, rx, spec in patterns:
        hits = [n for n in targets if rx.fullmatch(n)]
        tied_hits = [a for a, first in alias.items() if first in targets and rx.fullmatch(a)]
        if not hits and not tied_hits:
            unused.append(key)
        for n in hits + tied_hits:
            first = alias.get(n, n)
            if first not in exact:
                if first in chosen:
                    ask(n, spec) if chosen[first] != spec else None
                else:
                    ask(n, spec)
                chosen.setdefault(first, spec)
    for cls, spec in types:
        hits = [n for n, m in targets.items() if isinstance(m, cls)]
        if not hits:
            unused.append(cls.__name__)
    for n, m in targets.items():
        if n not in chosen:
            match = [(len(cls.__mro__), spec) for cls, spec in types if isinstance(m, cls)]
            if match:
                chosen[n] = max(match, key=lambda t: t[0])[1]
    if unused:
        sample = ", ".join(list(targets)[:5])
        raise ValueError(
            f"{len(unused)} key(s) match no target layer of {type(model).__name__}: {unused[:10]}. "
            f"Target layers are Linear/Conv1d/Conv2d with >= {min_numel} weights, "
            f"named like: {sample}"
        )
    return {n: chosen[n] for n in every if chosen.get(n) is not None}


@dataclass(frozen=True)
class ModelIdentity:
    """What a recipe was computed for: class, parameter count, and content fingerprint."""

    cls: str
    parameters: int
    fingerprint: str  # sha256 over parameter names, shapes and fp16 values

    @classmethod
    def of(cls, model: nn.Module) -> "ModelIdentity":
        h = hashlib.sha256()
        count = 0
        for name, p in model.named_parameters():
            t = p.detach().to(torch.float16).cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.int16).numpy().tobytes())
            count += p.numel()
        return cls(type(model).__name__, count, "sha256:" + h.hexdigest())


@dataclass
class Recipe:
    """Per-layer specs (None: kept at 16 bits) with the size and PSNR they are predicted to give."""

    layers: dict[str, PaletteSpec | None]
    shapes: dict[str, tuple[int, ...]]
    fixed_bytes: int
    model: ModelIdentity
    predicted_psnr: float | None = None
    seed: int = 0
    palette_version: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # budget, method, gap, chunks, notes
    luts: dict[str, torch.Tensor] = field(default_factory=dict)  # stored LUTs (weighted k-means)

    @classmethod
    def from_specs(
        cls,
        model: nn.Module,
        spec_or_mapping: PaletteSpec | SpecMapping,
        *,
        min_numel: int = DEFAULT_MIN_NUMEL,
        predicted_psnr: float | None = None,
        seed: int = 0,
        info: dict[str, Any] | None = None,
    ) -> "Recipe":
        """The recipe for `model` that a spec (every target layer) or a mapping selects (see
        `resolve_specs`); target layers it does not select stay at 16 bits."""
        specs = resolve_specs(model, spec_or_mapping, min_numel)
        every = target_layers(model, 0)
        alias = _alias_map(model)
        named = {alias.get(k, k) for k in spec_or_mapping if isinstance(k, str)} if isinstance(spec_or_mapping, Mapping) else set()
        targets = {n: m for n, m in every.items() if m.weight.numel() >= min_numel or n in named}
        recipe = cls.dense(model, targets, predicted_psnr=predicted_psnr, seed=seed, info=info)
        for n, s in specs.items():
            s.n_groups(recipe.shapes[n][0], n)
            recipe.layers[n] = s
        return recipe

    @classmethod
    def dense(
        cls,
        model: nn.Module,
        targets: Mapping[str, nn.Module],
        *,
        predicted_psnr: float | None = None,
        seed: int = 0,
        info: dict[str, Any] | None = None,
    ) -> "Recipe":
        """`targets` of `model` all kept at 16 bits: the plan an allocation starts from."""
        shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
        return cls({n: None for n in targets}, shapes, fixed_bytes(model, targets), ModelIdentity.of(model),
                   predicted_psnr, seed, __version__, dict(info or {}))

    @property
    def size_bytes(self) -> int:
        """The whole model as stored: palettized target weights plus everything else at 16 bits."""
        return self.fixed_bytes + sum(layer_bytes(s, self.shapes[n]) for n, s in self.layers.items())

    @property
    def size_16bit_bytes(self) -> int:
        return self.fixed_bytes + sum(2 * math.prod(s) for s in self.shapes.values())

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per target weight, LUTs and scales included."""
        numel = sum(math.prod(s) for s in self.shapes.values())
        return 8 * sum(layer_bytes(s, self.shapes[n]) for n, s in self.layers.items()) / numel

    @property
    def palettized(self) -> dict[str, PaletteSpec]:
        return {n: s for n, s in self.layers.items() if s is not None}

    # -- applying ------------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise ValueError unless every recipe layer is a target of `model` with the same shape."""
        targets = target_layers(model, min_numel=0)
        alias = _alias_map(model)
        tied = [n for n in self.layers if n in alias]
        if tied:
            raise ValueError(
                f"this recipe names {tied[0]}, whose weight is tied to {alias[tied[0]]}'s (one Parameter): "
                f"a tied weight takes one palette, under {alias[tied[0]]}; recompute the recipe for this model"
            )
        unknown = [n for n in self.layers if n not in targets]
        mismatched = [
            f"{n}: recipe {self.shapes[n]} vs model {tuple(targets[n].weight.shape)}"
            for n in self.layers
            if n in targets and tuple(targets[n].weight.shape) != self.shapes[n]
        ]
        if unknown or mismatched:
            msg = [f"this recipe (for {self.model.cls}) does not fit {type(model).__name__}:"]
            if unknown:
                msg.append(f"{len(unknown)} layer name(s) not in the model: {unknown[:8]}")
            if mismatched:
                msg.append(f"{len(mismatched)} shape mismatch(es): {mismatched[:8]}")
            msg.append("compute a recipe for this model with allocate_bits")
            raise ValueError("\n".join(msg))

    def palettes(self, model: nn.Module, *, progress: bool = False) -> dict[str, Palette]:
        """The palette of every palettized layer of `model` (checked first), in module order:
        stored LUTs where the recipe has them (importance-weighted k-means), the exact k-means of
        the spec elsewhere; a layer that already carries a palette of the same layout keeps it
        (fitting its palettized weights again would drift a scaled one). The model is not changed.

        A stored LUT was chosen for the weights the recipe was computed on; on other weights (a
        fine-tune) those layers are clustered again, unweighted, with a warning."""
        self.check(model)
        modules = dict(model.named_modules())
        order = [n for n in modules if n in self.palettized]
        luts = self.luts
        if luts and ModelIdentity.of(model).fingerprint != self.model.fingerprint:
            warnings.warn(
                f"{len(luts)} layer(s) of this recipe use LUTs chosen for other weights; "
                "they are clustered again (unweighted) for this model", stacklevel=2,
            )
            luts = {}
        out: dict[str, Palette] = {}
        for n in order:
            m, spec = modules[n], self.layers[n]
            if n in luts:
                out[n] = palette_from_lut(m.weight, spec, luts[n], name=n)  # type: ignore[arg-type]
            elif metadata.carries(m) and same_layout(metadata.spec_of(m, n), spec, m.weight.shape[0]):  # type: ignore[arg-type]
                out[n] = dataclasses.replace(metadata.read(m, n), spec=spec)
        rest = [n for n in order if n not in out]
        with tqdm(total=len(rest), desc="fit palettes", disable=not progress, leave=False) as bar:
            for batch in batches(rest, [modules[n].weight.numel() for n in rest]):
                items = [(modules[n].weight, [self.layers[n]], None) for n in batch]
                for n, (pal,) in zip(batch, fit_palettes_batch(items, seed=self.seed, names=batch)):
                    out[n] = pal
                bar.update(len(batch))
        return {n: out[n] for n in order}

    def diff(self, other: "Recipe", *, psnr_tol_db: float | None = None) -> "RecipeDiff":
        """What `other` changes from this recipe (`palette.recipe_diff.diff`): falsy when equivalent."""
        from .recipe_diff import diff

        return diff(self, other, psnr_tol_db=psnr_tol_db)

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "palette_version": self.palette_version,
            "seed": int(self.seed),
            "model": {"class": self.model.cls, "parameters": int(self.model.parameters),
                      "fingerprint": self.model.fingerprint},
            "size_bytes": self.size_bytes,
            "fixed_bytes": int(self.fixed_bytes),
            "predicted_psnr": None if self.predicted_psnr is None else float(self.predicted_psnr),
            "info": self.info,
            "layers": {n: self._layer_dict(n) for n in self.layers},
        }

    def _layer_dict(self, name: str) -> dict[str, Any]:
        spec = self.layers[name]
        d: dict[str, Any] = {"shape": [int(x) for x in self.shapes[name]], "spec": None if spec is None else spec.to_dict()}
        if name in self.luts:
            d["lut"] = self.luts[name].numpy().astype("<f2").tobytes().hex()
        return d

    def dumps(self) -> str:
        """Deterministic JSON: same recipe, same bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1, allow_nan=False, default=plain) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, self.dumps())

    @classmethod
    def from_dict(cls, d: Any, where: str = "recipe") -> "Recipe":
        """The recipe a parsed JSON document describes; every field's type and range is checked,
        and anything wrong is a `LoadError` (a ValueError) naming `where` and the field."""
        hint = "; regenerate it with allocate_bits (CLI: palette allocate)"
        check_header(d, FORMAT, VERSION, where, "recipe")
        try:
            expected = {"format", "version", "palette_version", "seed", "model", "size_bytes",
                        "fixed_bytes", "predicted_psnr", "info", "layers"}
            if set(d) != expected:
                raise ValueError(f"unexpected or missing keys: {sorted(map(str, set(d) ^ expected))}")
            m = dict_field(d["model"], "model")
            model = ModelIdentity(str_field(field_of(m, "class", "model"), "model.class"),
                                  int_field(field_of(m, "parameters", "model"), "model.parameters"),
                                  str_field(field_of(m, "fingerprint", "model"), "model.fingerprint"))
            if not dict_field(d["layers"], "layers"):
                raise ValueError("layers must be a non-empty object")
            layers: dict[str, PaletteSpec | None] = {}
            shapes: dict[str, tuple[int, ...]] = {}
            luts: dict[str, torch.Tensor] = {}
            for name, rec in d["layers"].items():
                if not isinstance(rec, dict) or not {"shape", "spec"} <= set(rec) <= {"shape", "spec", "lut"}:
                    raise ValueError(f"layer {name!r}: expected keys shape, spec (and lut), got {_short(rec)}")
                shape = tuple(int_field(x, f"layer {name!r} shape", 1)
                              for x in list_field(rec["shape"], f"layer {name!r} shape"))
                if not shape:
                    raise ValueError(f"layer {name!r}: empty shape")
                spec = None if rec["spec"] is None else PaletteSpec.from_dict(rec["spec"], f"layer {name!r}")
                if spec is not None:
                    spec.n_groups(shape[0], name)
                if "lut" in rec:
                    luts[name] = _lut(rec["lut"], spec, shape, name)
                layers[name], shapes[name] = spec, shape
            psnr = float_field(d["predicted_psnr"], "predicted_psnr", none=True)
            recipe = cls(layers, shapes, int_field(d["fixed_bytes"], "fixed_bytes"), model, psnr,
                         int_field(d["seed"], "seed", None), str_field(d["palette_version"], "palette_version"),
                         dict(dict_field(d["info"], "info")), luts)
            size = int_field(d["size_bytes"], "size_bytes")
            if recipe.size_bytes != size:
                raise ValueError(
                    f"size_bytes {size} does not match its layers ({recipe.size_bytes}): "
                    "the file was edited by hand or is damaged"
                )
            return recipe
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as e:
            raise LoadError(f"{where}: invalid recipe: {e}{hint}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        """Read a recipe file; a damaged or hand-broken one is a `LoadError` naming it."""
        return cls.from_dict(read_json(path, "recipe", "; regenerate it with allocate_bits"), str(path))

    # -- Apple ml-stable-diffusion ---------------------------------------------------------------
    def apple_size_bytes(self) -> int:
        """The size of the model Apple's apply step makes of this recipe: it palettizes (per tensor)
        only weights of more than 1e5 elements and leaves every other one at fp16."""
        return self.fixed_bytes + sum(
            layer_bytes(s if math.prod(self.shapes[n]) >= APPLE_MIN_NUMEL else None, self.shapes[n])
            for n, s in self.layers.items()
        )

    def to_apple(self, name: str | None = None, model_version: str | None = None, *,
                 allow_partial: bool = False) -> dict[str, Any]:
        """Apple's pre-analysis JSON with this recipe as one entry: {module_name: nbits or 16}.

        Only per-tensor scalar palettes with nbits in {1, 2, 4, 6, 8} exist in Apple's format, and
        its apply step palettizes only weights above 1e5 elements: a recipe that palettizes smaller
        ones would be applied in part, so that is a ValueError naming them and the bytes it would
        cost, unless `allow_partial` (then a warning). Recipes from
        `allocate_bits(..., candidates=APPLE)` (CLI `--apple-json`) are applied in full.
        `model_version` is the hub id Apple's scripts load (default: the recipe's `info["model_id"]`,
        else the model class name)."""
        entry: dict[str, int] = {}
        for n, s in self.layers.items():
            if s is not None and (s.granularity != "per_tensor" or s.cluster_dim != 1
                                  or s.per_channel_scale or s.nbits not in APPLE_NBITS):
                raise ValueError(
                    f"{n}: {s.label} has no equivalent in Apple's recipe format "
                    f"(per-tensor, nbits in {APPLE_NBITS} only); allocate with candidates=APPLE"
                )
            entry[n] = 16 if s is None else s.nbits
        dropped = [n for n, s in self.palettized.items() if math.prod(self.shapes[n]) < APPLE_MIN_NUMEL]
        if dropped:
            extra = self.apple_size_bytes() - self.size_bytes
            msg = (
                f"Apple's apply step palettizes only weights of more than 1e5 elements: it would leave "
                f"{len(dropped)} palettized layer(s) of this recipe at fp16 ({', '.join(dropped[:5])}"
                f"{' ...' if len(dropped) > 5 else ''}), {extra:,} B more: {self.apple_size_bytes():,} B "
                f"instead of {self.size_bytes:,} B. Allocate with candidates=APPLE (CLI --apple-json) "
                "for a recipe Apple's flow applies in full"
            )
            if not allow_partial:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        key = name or f"recipe_{self.bits_per_weight:.2f}_bit_mixedpalette"
        version = model_version or self.info.get("model_id") or self.model.cls
        return {"model_version": version, "baselines": {}, "recipes": {key: entry}}

    @classmethod
    def load_apple(cls, path: str | os.PathLike, recipe_name: str, model: nn.Module) -> "Recipe":
        """`from_apple` of the pre-analysis JSON file at `path` (checked by `read_apple`)."""
        return cls.from_apple(read_apple(path), recipe_name, model)

    @classmethod
    def from_apple(cls, data: Mapping[str, Any], recipe_name: str, model: nn.Module) -> "Recipe":
        """Import one recipe of Apple's pre-analysis JSON for `model` (names are resolved against it)."""
        check_apple(data, "Apple pre-analysis JSON")
        recipes = data.get("recipes") if isinstance(data, Mapping) else None
        if not isinstance(recipes, Mapping) or recipe_name not in recipes:
            have = list(recipes) if isinstance(recipes, Mapping) else []
            raise ValueError(f"recipe {recipe_name!r} not in the pre-analysis JSON; it has {have}")
        targets = target_layers(model, min_numel=0)
        layers: dict[str, PaletteSpec | None] = {}
        for n, nbits in recipes[recipe_name].items():
            if nbits not in (*APPLE_NBITS, 16):
                raise ValueError(f"{n}: nbits {nbits!r} is not one of {APPLE_NBITS} or 16")
            layers[n] = None if nbits == 16 else PaletteSpec(nbits)
        unknown = [n for n in layers if n not in targets]
        if unknown:
            raise ValueError(f"{len(unknown)} module name(s) not in {type(model).__name__}: {unknown[:8]}")
        return cls.from_specs(model, layers, info={"source": f"apple:{recipe_name}"})


# What Apple's ml-stable-diffusion flow applies in full: its pre-analysis candidates (Linear and
# Conv2d above 1e5 weights) at per-tensor 1, 2, 4, 6 or 8 bits.
APPLE = Candidates(nbits=APPLE_NBITS, granularities=("per_tensor",), min_numel=APPLE_MIN_NUMEL,
                   types=(nn.Linear, nn.Conv2d))


def check_apple(data: Any, where: str) -> dict:
    """Apple's pre-analysis JSON, checked: an object with `recipes` ({name: {module: nbits}}, nbits
    among 1, 2, 4, 6, 8 or 16), optional `baselines` ({module: finite PSNR}) and `model_version`
    (a string); anything else is a `LoadError` naming `where`."""
    try:
        d = dict_field(data, "the document")
        unknown = set(d) - {"model_version", "baselines", "recipes"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(map(str, unknown))}")
        if "model_version" in d and d["model_version"] is not None:
            str_field(d["model_version"], "model_version")
        for n, v in dict_field(d.get("baselines", {}), "baselines").items():
            float_field(v, f"baselines[{n!r}]")
        for r, entry in dict_field(field_of(d, "recipes", "the document"), "recipes").items():
            for n, nbits in dict_field(entry, f"recipes[{r!r}]").items():
                if isinstance(nbits, bool) or nbits not in (*APPLE_NBITS, 16) or not isinstance(nbits, int):
                    raise ValueError(f"recipes[{r!r}][{n!r}]: nbits {_short(nbits)} is not one of {APPLE_NBITS} or 16")
        return d
    except ValueError as e:
        raise LoadError(f"{where}: invalid Apple pre-analysis JSON: {e}") from None


def read_apple(path: str | os.PathLike) -> dict:
    """Read and check Apple's pre-analysis JSON (`check_apple`); a damaged file is a `LoadError`."""
    return check_apple(read_json(path, "Apple pre-analysis JSON"), str(path))


def same_layout(a: PaletteSpec, b: PaletteSpec, out_channels: int) -> bool:
    """Whether two specs store a weight of `out_channels` rows alike (same LUTs, vectors, scale)."""
    return (a.nbits, a.cluster_dim, a.per_channel_scale, a.n_groups(out_channels)) == (
        b.nbits, b.cluster_dim, b.per_channel_scale, b.n_groups(out_channels))


def as_recipe(model: nn.Module, plan: "Recipe | PaletteSpec | SpecMapping", **kwargs: Any) -> Recipe:
    """The Recipe a plan stands for: a Recipe as it is, a spec or a mapping through
    `Recipe.from_specs(model, plan, **kwargs)`."""
    if isinstance(plan, Recipe):
        return plan
    if isinstance(plan, Mapping) and any(isinstance(v, Palette) for v in plan.values()):
        raise ValueError(
            "fitted palettes are not a plan: write them with apply_palettes(model, palettes) and "
            "pass the model, which then carries them"
        )
    return Recipe.from_specs(model, plan, **kwargs)


def _lut(text: Any, spec: PaletteSpec | None, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A stored LUT: hex of little-endian fp16, (groups, 2^nbits, 1) for the layer's spec."""
    if spec is None or spec.cluster_dim != 1:
        raise ValueError(f"layer {name!r}: a stored lut needs a scalar spec")
    want = (spec.n_groups(shape[0], name), spec.n_entries, 1)
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ValueError(f"layer {name!r}: lut is not a hex string") from None
    if len(raw) != 2 * math.prod(want):
        raise ValueError(f"layer {name!r}: lut has {len(raw) // 2} entries, expected {math.prod(want)}")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float16).reshape(want))


__all__ = ["APPLE", "NBITS", "Candidates", "ModelIdentity", "Recipe", "as_recipe", "resolve_specs", "target_layers",
           "tied_layers"]
