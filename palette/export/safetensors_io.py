"""Palettes as safetensors, for conversion flows other than Core ML (MLX, ggml-style runtimes).

Per palettized layer `<name>`:
  `<name>.indices`  uint8, 1-D: the indices bit-packed at nbits each, least significant bit
                    first (index i in bits [i*nbits, (i+1)*nbits) of the little-endian bit
                    stream, as Core ML stores them; see palette.export.packing), in the order of
                    `Palette.indices` (shape (out_channels // cluster_dim, *weight.shape[1:]),
                    row-major); the last byte is zero-padded.
  `<name>.lut`      float16 (groups, 2**nbits, cluster_dim); group g covers output channels
                    [g*group_size, (g+1)*group_size); a vector index covers cluster_dim
                    consecutive output channels.
  `<name>.scale`    float16 (out_channels,), only with per_channel_scale: weight = LUT[indices] * scale.
The safetensors metadata has one key, `palette`, a JSON object: `format_version` = "1",
`bit_order` = "lsb-first", `spec_fields` (the PaletteSpec field names) and `layers`, a list in
model order of [name, [spec field values in `spec_fields` order], weight shape] (compact, since
the header is a visible share of small models' files). One key, because safetensors writes its
metadata map in hash order, which changes from run to run: with one key the bytes are
deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..cluster import Palette
from ..spec import PaletteSpec
from .packing import pack_bits, unpack_bits
from .recipe_input import RecipeLike, check_palette, recipe_palettes

FORMAT = "palette"
FORMAT_VERSION = "1"
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(PaletteSpec))


def export_palettes(
    model_or_palettes: nn.Module | Mapping[str, Palette],
    path: str | os.PathLike,
    recipe: RecipeLike = None,
) -> int:
    """Write palettes to a safetensors file; returns the file size in bytes.

    Pass fitted palettes {name: Palette}, or a model with a `recipe` (fitted here, the model is
    not changed). The bytes depend only on the palettes: the same palettes give the same file.
    """
    from safetensors.numpy import save_file

    if isinstance(model_or_palettes, nn.Module):
        if recipe is None:
            raise ValueError("export_palettes(model, path) needs recipe= (specs or fitted palettes)")
        palettes = recipe_palettes(model_or_palettes, recipe)
    elif recipe is not None:
        raise ValueError("recipe= applies to a model; palettes are exported as given")
    else:
        palettes = dict(model_or_palettes)
    tensors: dict[str, np.ndarray] = {}
    layers = []
    for name, pal in palettes.items():
        check_palette(pal, name)
        tensors[f"{name}.indices"] = pack_bits(pal.indices.numpy(), pal.spec.nbits)
        tensors[f"{name}.lut"] = np.ascontiguousarray(pal.lut.numpy())
        if pal.scale is not None:
            tensors[f"{name}.scale"] = np.ascontiguousarray(pal.scale.numpy())
        layers.append([name, [getattr(pal.spec, f) for f in SPEC_FIELDS], list(pal.shape)])
    header = {
        "format_version": FORMAT_VERSION,
        "bit_order": "lsb-first",
        "spec_fields": list(SPEC_FIELDS),
        "layers": layers,
    }
    save_file(tensors, str(path), metadata={FORMAT: json.dumps(header, sort_keys=True, separators=(",", ":"))})
    return os.path.getsize(path)


def load_palettes(path: str | os.PathLike) -> dict[str, Palette]:
    """Read palettes written by `export_palettes`, exactly as they were."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if FORMAT not in meta:
            raise ValueError(f"{path}: not a palette file (no {FORMAT!r} key in its safetensors metadata)")
        header = json.loads(meta[FORMAT])
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: palette format version {header.get('format_version')!r}; this palette reads {FORMAT_VERSION}"
            )
        fields = header["spec_fields"]
        keys = set(f.keys())
        palettes = {}
        for name, values, shape in header["layers"]:
            spec = PaletteSpec.from_dict(dict(zip(fields, values)))
            shape = tuple(shape)
            count = math.prod(shape) // spec.cluster_dim
            idx = unpack_bits(f.get_tensor(f"{name}.indices"), spec.nbits, count)
            indices = torch.from_numpy(idx).reshape(shape[0] // spec.cluster_dim, *shape[1:])
            lut = torch.from_numpy(f.get_tensor(f"{name}.lut").copy())
            scale_key = f"{name}.scale"
            scale = torch.from_numpy(f.get_tensor(scale_key).copy()) if scale_key in keys else None
            pal = Palette(lut, indices, spec, scale)
            check_palette(pal, name, shape)
            palettes[name] = pal
    return palettes
