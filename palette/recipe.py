"""`Recipe`: the palettization choice for every target layer of a model, as a checked JSON file.

A recipe names layers by fully-qualified module name and records each one's weight shape, so it
applies to any model of the same architecture (a fine-tune included) and refuses one whose names
or shapes differ. It also records what it predicts (stored size, latent PSNR) and where it came
from (model identity, palette version, seed), and converts to and from Apple ml-stable-diffusion's
mixed-bit pre-analysis JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._jsonio import read_json, write_atomic
from .cluster import Palette, fit_palettes_batch, palette_from_lut
from .measure import Measurement, measure
from .palettize import DEFAULT_MIN_NUMEL, apply_palettes, batches, target_layers
from .spec import NBITS, PaletteSpec

FORMAT = "palette.recipe"
VERSION = 1
APPLE_NBITS = (1, 2, 4, 6, 8)  # what ml-stable-diffusion's MBP flow accepts (16: keep fp16)


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

    def palettes(self, model: nn.Module) -> dict[str, Palette]:
        """The palette of every palettized layer of `model` (checked first): stored LUTs where the
        recipe has them (importance-weighted k-means), the exact k-means of the spec elsewhere.

        A stored LUT was chosen for the weights the recipe was computed on; on other weights (a
        fine-tune) those layers are clustered again, unweighted, with a warning."""
        self.check(model)
        modules = dict(model.named_modules())
        luts = self.luts
        if luts and ModelIdentity.of(model).fingerprint != self.model.fingerprint:
            warnings.warn(
                f"{len(luts)} layer(s) of this recipe use LUTs chosen for other weights; "
                "they are clustered again (unweighted) for this model", stacklevel=2,
            )
            luts = {}
        out = {n: palette_from_lut(modules[n].weight, self.layers[n], lut, name=n)  # type: ignore[arg-type]
               for n, lut in luts.items()}
        rest = [n for n in self.palettized if n not in out]
        for batch in batches(rest, [modules[n].weight.numel() for n in rest]):
            items = [(modules[n].weight, [self.layers[n]], None) for n in batch]
            for n, (pal,) in zip(batch, fit_palettes_batch(items, seed=self.seed, names=batch)):
                out[n] = pal
        return {n: out[n] for n in self.palettized}

    def validate(self, model: nn.Module, inputs: Any = None, **probe_kwargs: Any) -> Measurement:
        """Measure the real latent PSNR (and MSE, cosine) of this recipe on `model`, left unchanged;
        the size is exact by construction (`size_bytes`)."""
        return measure(model, self.palettes(model), inputs, seed=self.seed, **probe_kwargs)

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "palette_version": self.palette_version,
            "seed": self.seed,
            "model": {"class": self.model.cls, "parameters": self.model.parameters,
                      "fingerprint": self.model.fingerprint},
            "size_bytes": self.size_bytes,
            "fixed_bytes": self.fixed_bytes,
            "predicted_psnr": self.predicted_psnr,
            "info": self.info,
            "layers": {n: self._layer_dict(n) for n in self.layers},
        }

    def _layer_dict(self, name: str) -> dict[str, Any]:
        spec = self.layers[name]
        d: dict[str, Any] = {"shape": list(self.shapes[name]), "spec": None if spec is None else spec.to_dict()}
        if name in self.luts:
            d["lut"] = self.luts[name].numpy().astype("<f2").tobytes().hex()
        return d

    def dumps(self) -> str:
        """Deterministic JSON: same recipe, same bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, self.dumps())

    @classmethod
    def from_dict(cls, d: Any, where: str = "recipe") -> "Recipe":
        try:
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} document (format={d.get('format') if isinstance(d, dict) else None!r})")
            if d.get("version") != VERSION:
                raise ValueError(f"unsupported version {d.get('version')!r}; this palette reads {VERSION}")
            expected = {"format", "version", "palette_version", "seed", "model", "size_bytes",
                        "fixed_bytes", "predicted_psnr", "info", "layers"}
            if set(d) != expected:
                raise ValueError(f"unexpected or missing keys: {sorted(set(d) ^ expected)}")
            m = d["model"]
            model = ModelIdentity(str(m["class"]), _int(m["parameters"], "model.parameters"),
                                  str(m["fingerprint"]))
            if not isinstance(d["layers"], dict) or not d["layers"]:
                raise ValueError("layers must be a non-empty object")
            layers: dict[str, PaletteSpec | None] = {}
            shapes: dict[str, tuple[int, ...]] = {}
            luts: dict[str, torch.Tensor] = {}
            for name, rec in d["layers"].items():
                if not isinstance(rec, dict) or not {"shape", "spec"} <= set(rec) <= {"shape", "spec", "lut"}:
                    raise ValueError(f"layer {name!r}: expected keys shape, spec (and lut), got {rec!r}")
                shape = tuple(_int(x, f"layer {name!r} shape") for x in rec["shape"])
                if not shape or min(shape) < 1:
                    raise ValueError(f"layer {name!r}: bad shape {rec['shape']!r}")
                spec = None if rec["spec"] is None else PaletteSpec.from_dict(rec["spec"])
                if spec is not None:
                    spec.n_groups(shape[0], name)
                if "lut" in rec:
                    luts[name] = _lut(rec["lut"], spec, shape, name)
                layers[name], shapes[name] = spec, shape
            psnr = d["predicted_psnr"]
            if psnr is not None and not isinstance(psnr, (int, float)):
                raise ValueError(f"predicted_psnr must be a number or null, got {psnr!r}")
            recipe = cls(layers, shapes, _int(d["fixed_bytes"], "fixed_bytes"), model,
                         None if psnr is None else float(psnr), _int(d["seed"], "seed"),
                         str(d["palette_version"]), dict(d["info"]), luts)
            if recipe.size_bytes != d["size_bytes"]:
                raise ValueError(
                    f"size_bytes {d['size_bytes']} does not match its layers ({recipe.size_bytes}): "
                    "the file was edited by hand or is damaged"
                )
            return recipe
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{where}: invalid recipe: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        return cls.from_dict(read_json(path, "recipe", "; regenerate it with allocate_bits"), str(path))

    # -- Apple ml-stable-diffusion ---------------------------------------------------------------
    def to_apple(self, name: str | None = None, model_version: str | None = None) -> dict[str, Any]:
        """Apple's pre-analysis JSON with this recipe as one entry: {module_name: nbits or 16}.

        Only per-tensor scalar palettes with nbits in {1, 2, 4, 6, 8} exist in Apple's format."""
        entry: dict[str, int] = {}
        for n, s in self.layers.items():
            if s is not None and (s.granularity != "per_tensor" or s.cluster_dim != 1
                                  or s.per_channel_scale or s.nbits not in APPLE_NBITS):
                raise ValueError(
                    f"{n}: {s.label} has no equivalent in Apple's recipe format "
                    f"(per-tensor, nbits in {APPLE_NBITS} only)"
                )
            entry[n] = 16 if s is None else s.nbits
        key = name or f"recipe_{self.bits_per_weight:.2f}_bit_mixedpalette"
        return {"model_version": model_version or self.model.cls,
                "baselines": {}, "recipes": {key: entry}}

    @classmethod
    def from_apple(cls, data: Mapping[str, Any], recipe_name: str, model: nn.Module) -> "Recipe":
        """Import one recipe of Apple's pre-analysis JSON for `model` (names are resolved against it)."""
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
        return from_mapping(model, layers, info={"source": f"apple:{recipe_name}"})


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


def _int(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"{what}: expected an integer, got {x!r}")
    return x


def from_mapping(
    model: nn.Module,
    mapping: Mapping[str, PaletteSpec | None],
    *,
    min_numel: int = DEFAULT_MIN_NUMEL,
    predicted_psnr: float | None = None,
    seed: int = 0,
    info: dict[str, Any] | None = None,
) -> Recipe:
    """A recipe for `model` from {layer name: spec or None}; target layers not named stay at 16 bits."""
    from . import __version__

    targets = target_layers(model, min_numel)
    extra = [n for n in mapping if n not in targets]
    if extra:
        targets = {**targets, **{n: m for n, m in target_layers(model, 0).items() if n in extra}}
    unknown = [n for n in mapping if n not in targets]
    if unknown:
        raise ValueError(f"{len(unknown)} layer name(s) are not target layers of the model: {unknown[:8]}")
    layers = {n: mapping.get(n) for n in targets}
    shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
    for n, s in layers.items():
        if s is not None:
            s.n_groups(shapes[n][0], n)
    return Recipe(layers, shapes, fixed_bytes(model, targets), ModelIdentity.of(model),
                  predicted_psnr, seed, __version__, dict(info or {}))


def apply_recipe(model: nn.Module, recipe: Recipe) -> dict[str, Palette]:
    """Palettize `model` in place as `recipe` says (names and shapes checked first); returns the
    palettes by layer name."""
    if not isinstance(recipe, Recipe):
        raise ValueError(f"expected a Recipe (Recipe.load(path)), got {type(recipe).__name__}")
    palettes = recipe.palettes(model)
    apply_palettes(model, palettes)
    return palettes


__all__ = ["NBITS", "ModelIdentity", "Recipe", "apply_recipe", "from_mapping"]
