"""Palettes as safetensors, for conversion flows other than Core ML (MLX, ggml-style runtimes).

Format "palette" version 2: a standard safetensors file with at most three tensors, one per kind,
holding every palettized layer's data back to back in layer order:

  `indices`  uint8, 1-D: each layer's indices bit-packed at its nbits, least significant bit
             first (index i of a layer in bits [i*nbits, (i+1)*nbits) of that layer's bytes,
             bit b in byte b // 8 at position b % 8: Core ML's layout, see
             palette.export.packing), in row-major order of the layer's index array of shape
             (out_channels // cluster_dim, *weight.shape[1:]); each layer's last byte is
             zero-padded, so every layer starts on a byte boundary.
  `luts`     float16 (IEEE half, little-endian), 1-D: each layer's LUTs as a row-major
             (groups, 2**nbits, cluster_dim) array. Group g covers output channels
             [g*group_size, (g+1)*group_size) (one group for per_tensor); a vector entry covers
             cluster_dim consecutive output channels at one position.
  `scales`   float16, 1-D: one scale per output channel for the layers with per_channel_scale,
             nothing for the others; present only if some layer has scales.
             weight = LUT[indices] * scale.

The safetensors metadata has one key, `palette`, whose value is compact JSON (no spaces, keys
sorted; one key, because safetensors writes its metadata map in hash order):

  {"bit_order": "lsb-first", "format": "palette", "version": 2,
   "spec_fields": ["nbits", "granularity", "group_size", "cluster_dim", "per_channel_scale"],
   "specs": [[4, "per_grouped_channel", 16, 1, false], ...],   # the distinct PaletteSpecs
   "layers": [[name, spec_index, weight_shape], ...],          # in model order
   "offsets": {"indices": [...], "luts": [...], "scales": [...]}}

Each `offsets` list has len(layers) + 1 non-decreasing entries, from 0 to the tensor's length,
counted in elements of that tensor (bytes for `indices`, fp16 values for `luts` and `scales`;
"scales" only when the `scales` tensor exists). Layer k's data is
`tensor[offsets[kind][k] : offsets[kind][k + 1]]`: reshape its LUT slice to
(groups, 2**nbits, cluster_dim), unpack its index bytes into prod(weight_shape) // cluster_dim
indices; an empty scale slice means no scale. A spec's fields are PaletteSpec's, in
`spec_fields` order (group_size is null for per_tensor). The sizes follow from spec and shape
(`PaletteSpec.nbytes`); the reader checks every slice against them. The tensor data is exactly
the sum of the layers' `PaletteSpec.nbytes`; the header adds roughly the layer names' length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._jsonio import LoadError, atomic_path, loads_json
from ..cluster import Palette, check_palette
from ..palettize import planned_palettes
from ..recipe import Recipe, SpecMapping
from ..spec import PaletteSpec
from .packing import pack_bits, packed_nbytes, unpack_bits

FORMAT = "palette"
FORMAT_VERSION = 2
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(PaletteSpec))
KINDS = ("indices", "luts", "scales")
DTYPES = {"indices": np.uint8, "luts": np.float16, "scales": np.float16}


def export_palettes(
    model_or_palettes: nn.Module | Mapping[str, Palette],
    path: str | os.PathLike,
    recipe: Recipe | SpecMapping | None = None,
) -> int:
    """Write palettes to a safetensors file; returns the file size in bytes.

    Pass fitted palettes {name: Palette} (written in the given order), or a model: with a `recipe`
    its palettes (fitted here, the model is not changed), without one the palettes the model
    carries, in module order. The bytes depend only on the palettes and their order: the same
    palettes give the same file, from the API and the CLI alike.
    """
    from safetensors.numpy import save_file

    if isinstance(model_or_palettes, nn.Module):
        palettes = planned_palettes(model_or_palettes, recipe)
        if not palettes:
            raise ValueError("the model carries no palettes and no recipe= was given: nothing to export")
    elif recipe is not None:
        raise ValueError("recipe= applies to a model; palettes are exported as given")
    else:
        palettes = dict(model_or_palettes)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
    offsets: dict[str, list[int]] = {k: [0] for k in KINDS}
    specs: dict[PaletteSpec, int] = {}
    layers = []
    for name, pal in palettes.items():
        if not isinstance(name, str):
            raise ValueError(f"layer names must be strings, got {name!r}")
        check_palette(pal, name)
        data = {
            "indices": pack_bits(pal.indices.numpy(), pal.spec.nbits),
            "luts": pal.lut.numpy().reshape(-1),
            "scales": pal.scale.numpy().reshape(-1) if pal.scale is not None else np.zeros(0, np.float16),
        }
        for kind, arr in data.items():
            parts[kind].append(arr)
            offsets[kind].append(offsets[kind][-1] + arr.size)
        layers.append([name, specs.setdefault(pal.spec, len(specs)), list(pal.shape)])
    if offsets["scales"][-1] == 0:
        del parts["scales"], offsets["scales"]
    tensors = {
        kind: np.concatenate(arrs) if arrs else np.zeros(0, DTYPES[kind]) for kind, arrs in parts.items()
    }
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "bit_order": "lsb-first",
        "spec_fields": list(SPEC_FIELDS),
        "specs": [[getattr(s, f) for f in SPEC_FIELDS] for s in specs],
        "layers": layers,
        "offsets": offsets,
    }
    with atomic_path(path) as tmp:  # whole or not at all, beside `path`
        save_file(tensors, str(tmp), metadata={FORMAT: json.dumps(header, sort_keys=True, separators=(",", ":"))})
    return os.path.getsize(path)


def load_palettes(path: str | os.PathLike) -> dict[str, Palette]:
    """Read palettes written by `export_palettes`, exactly as they were.

    Raises ValueError naming the problem for files that are not palette files, of another format
    version, or whose header and tensors disagree (offsets out of range, wrong sizes, ...).
    """
    from safetensors import SafetensorError, safe_open

    if Path(path).is_dir():
        raise LoadError(f"{path}: is a directory, not a palettes file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OverflowError, TypeError, ValueError) as e:
        raise LoadError(f"{path}: damaged safetensors file ({str(e).splitlines()[0][:200]}); "
                        "export the palettes again (palette export -o NAME.safetensors)") from None
    if True:
        if FORMAT not in meta:
            raise LoadError(f"{path}: not a palette file (no {FORMAT!r} key in its safetensors metadata)")
        header = loads_json(meta[FORMAT], str(path), f"palettes ({FORMAT!r} metadata)")
        if not isinstance(header, dict):
            raise ValueError(f"{path}: the {FORMAT!r} metadata must be a JSON object")
        version = header.get("version", header.get("format_version"))
        if header.get("format", FORMAT) != FORMAT or version != FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(
                f"{path}: palette format {header.get('format')!r} version {version!r}; "
                f"this palette reads format {FORMAT!r} version {FORMAT_VERSION}"
            )
    try:
        return _palettes_from(header, tensors, str(path))
    except LoadError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, IndexError) as e:
        raise LoadError(f"{path}: invalid palettes file: {e}") from None


def _palettes_from(header: dict[str, Any], tensors: dict[str, np.ndarray], path: str) -> dict[str, Palette]:
    def bad(msg: str) -> ValueError:
        return LoadError(f"{path}: {msg}")

    if header.get("bit_order") != "lsb-first":
        raise bad(f"bit_order {header.get('bit_order')!r}; only 'lsb-first' is defined")
    fields = header.get("spec_fields")
    if not isinstance(fields, list) or sorted(map(str, fields)) != sorted(SPEC_FIELDS):
        raise bad(f"spec_fields {fields!r} are not PaletteSpec's fields {list(SPEC_FIELDS)}")
    raw_specs, layers, offsets = header.get("specs"), header.get("layers"), header.get("offsets")
    if not isinstance(raw_specs, list) or not isinstance(layers, list) or not isinstance(offsets, dict):
        raise bad("the header needs lists 'specs' and 'layers' and an object 'offsets'")
    specs = []
    for i, values in enumerate(raw_specs):
        if not isinstance(values, list) or len(values) != len(fields):
            raise bad(f"spec {i} must list {len(fields)} values, got {values!r}")
        try:
            specs.append(PaletteSpec.from_dict(dict(zip(fields, values))))
        except (TypeError, ValueError) as e:
            raise bad(f"spec {i} {values!r}: {e}") from None

    kinds = [k for k in KINDS if k in offsets]
    if set(offsets) - set(KINDS) or not {"indices", "luts"} <= set(kinds):
        raise bad(f"offsets must have 'indices', 'luts' and optionally 'scales'; got {sorted(offsets)}")
    if set(tensors) != set(kinds):
        raise bad(f"tensors {sorted(tensors)} do not match the header's {kinds}")
    for kind in kinds:
        arr, offs = tensors[kind], offsets[kind]
        want = np.dtype(DTYPES[kind])
        if arr.dtype != want or arr.ndim != 1:
            raise bad(f"tensor {kind!r} must be 1-D {want}, got {arr.ndim}-D {arr.dtype}")
        if (
            not isinstance(offs, list)
            or len(offs) != len(layers) + 1
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise bad(f"offsets[{kind!r}] must be {len(layers) + 1} integers (one more than layers)")
        if offs[0] != 0 or offs[-1] != arr.size or any(a > b for a, b in zip(offs, offs[1:])):
            raise bad(
                f"offsets[{kind!r}] out of range: must rise from 0 to the tensor's {arr.size} "
                f"elements, got {offs[0]} .. {offs[-1]}"
            )

    palettes: dict[str, Palette] = {}
    for k, layer in enumerate(layers):
        if (
            not isinstance(layer, list)
            or len(layer) != 3
            or not isinstance(layer[0], str)
            or not isinstance(layer[1], int)
            or not isinstance(layer[2], list)
        ):
            raise bad(f"layer {k} must be [name, spec_index, shape], got {layer!r}")
        name, s, shape = layer
        if name in palettes:
            raise bad(f"layer {name!r} appears twice")
        if isinstance(s, bool) or not 0 <= s < len(specs):
            raise bad(f"{name}: spec index {s!r} out of range (the file has {len(specs)} specs)")
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise bad(f"{name}: shape {shape!r} must be positive integers")
        spec, shape = specs[s], tuple(shape)
        try:
            groups = spec.n_groups(shape[0], name)
        except ValueError as e:
            raise bad(str(e)) from None
        count = math.prod(shape) // spec.cluster_dim
        want = {
            "indices": packed_nbytes(count, spec.nbits),
            "luts": groups * spec.n_entries * spec.cluster_dim,
            "scales": shape[0] if spec.per_channel_scale else 0,
        }
        got = {kind: tensors[kind][offsets[kind][k] : offsets[kind][k + 1]] for kind in kinds}
        got.setdefault("scales", np.zeros(0, np.float16))
        for kind, n in want.items():
            if got[kind].size != n:
                raise bad(
                    f"{name}: {got[kind].size} {kind} elements in the file; its spec "
                    f"({spec.label}) and shape {shape} need {n}"
                )
        used = count * spec.nbits % 8
        if used and int(got["indices"][-1]) >> used:
            raise bad(f"{name}: the padding bits after its last index are not zero")
        idx = unpack_bits(got["indices"], spec.nbits, count)
        indices = torch.from_numpy(idx).reshape(shape[0] // spec.cluster_dim, *shape[1:])
        lut = torch.from_numpy(got["luts"].copy()).reshape(groups, spec.n_entries, spec.cluster_dim)
        scale = torch.from_numpy(got["scales"].copy()) if spec.per_channel_scale else None
        pal = Palette(lut, indices, spec, scale)
        try:
            check_palette(pal, name, shape)
        except ValueError as e:
            raise bad(str(e)) from None
        palettes[name] = pal
    return palettes
