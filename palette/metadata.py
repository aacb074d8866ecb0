"""The palettes a model carries: coremltools' torch-side compression metadata on each layer.

coremltools' torch frontend reads, from the traced model's state_dict, buffers named
`<module>._COREML_/weight/<key>` (converter.py, `_construct_compression_info`): `compression_type`
= [2] (palettization), `lut` of rank weight.rank + 2 (groups of output channels on axis 0, then
2^nbits entries, then cluster_dim), `vector_axis` = 0, and `palettization_scale` of the weight's
rank. With any deployment target of iOS16 or later it then emits `constexpr_lut_to_dense` for that
weight. It does not read indices: it takes, for every weight value divided by the scale, the
nearest LUT entry. So a palettized layer holds LUT[indices] * scale computed exactly in fp32 (a
product of two fp16 values fits fp32's significand): divided by the fp16 scale it gives the LUT
entry back exactly, and the nearest entry is the palette's own, never a re-clustering.

The buffers are registered non-persistent: a traced model's state_dict still holds them (so any
`ct.convert(torch.jit.trace(...))` sees them), while the model's own `state_dict`,
`load_state_dict` and diffusers' `save_pretrained` / `from_pretrained` stay exactly those of a
dense model of the same weights. `palette.export_palettes` writes the palettes themselves.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .cluster import Palette, palette_from_lut
from .spec import NBITS, PaletteSpec

PREFIX = "_COREML_"
VERSION_KEY = f"{PREFIX}/metadata_version"
METADATA_VERSION = 1  # coremltools.optimize.torch's register_metadata_version
PALETTIZATION = 2  # coremltools' CompressionType.palettization
LUT = f"{PREFIX}/weight/lut"
SCALE = f"{PREFIX}/weight/palettization_scale"
TYPE = f"{PREFIX}/weight/compression_type"
AXIS = f"{PREFIX}/weight/vector_axis"


def exact_weight(pal: Palette) -> torch.Tensor:
    """LUT[indices] * scale in fp32 without rounding (see the module docstring); for a palette
    without a scale this equals `pal.dequantize()` exactly."""
    unscaled = dataclasses.replace(pal, spec=dataclasses.replace(pal.spec, per_channel_scale=False), scale=None)
    w = unscaled.dequantize().float()
    if pal.scale is not None:
        w = w * pal.scale.float().reshape(-1, *[1] * (w.dim() - 1))
    return w


def buffers(pal: Palette, weight_rank: int) -> dict[str, torch.Tensor]:
    """The `_COREML_/weight/...` buffers describing `pal` for a weight of rank `weight_rank`."""
    groups, k, d = pal.lut.shape
    ones = [1] * (weight_rank - 1)
    out = {
        TYPE: torch.tensor([PALETTIZATION]),
        LUT: pal.lut.reshape(groups, *ones, k, d).clone(),
        AXIS: torch.tensor(0),
    }
    if pal.scale is not None:
        out[SCALE] = pal.scale.reshape(-1, *ones).clone()
    return out


def keys(module: nn.Module) -> list[str]:
    """Names of the module's own `_COREML_` buffers."""
    return [n for n in module._buffers if n.startswith(PREFIX)]


def attach(module: nn.Module, pal: Palette) -> None:
    """Write `pal` into `module.weight` (exactly, see `exact_weight`) and register its metadata,
    replacing any the module carried."""
    w = module.weight
    with torch.no_grad():
        w.copy_(exact_weight(pal).reshape(w.shape).to(w.device, w.dtype))
    detach(module)
    for key, buf in buffers(pal, w.dim()).items():
        module.register_buffer(key, buf.to(w.device), persistent=False)


def detach(module: nn.Module) -> bool:
    """Drop the module's `_COREML_` buffers (its weight is left as it is); whether it had any."""
    names = keys(module)
    for n in names:
        del module._buffers[n]
        module._non_persistent_buffers_set.discard(n)
    return bool(names)


def carries(module: nn.Module) -> bool:
    return LUT in module._buffers


def mark_root(model: nn.Module) -> None:
    """Register the metadata version on the model's root, as coremltools' finalize does."""
    if VERSION_KEY not in model._buffers:
        model.register_buffer(VERSION_KEY, torch.tensor(METADATA_VERSION), persistent=False)


def spec_of(module: nn.Module, name: str) -> PaletteSpec:
    """The PaletteSpec a module's metadata describes (one LUT group on the output channels reads
    as per_tensor: the two store the same bytes)."""
    bufs = module._buffers
    ctype = bufs.get(TYPE)
    if ctype is None or ctype.tolist() != [PALETTIZATION]:
        raise ValueError(
            f"{name}: its {PREFIX} metadata is not a palettization (compression_type "
            f"{None if ctype is None else ctype.tolist()}); palette reads palettized weights only"
        )
    lut, w = bufs[LUT], module.weight
    if lut.dim() == w.dim() + 1:  # coremltools allows the vector axis to be left out
        lut = lut.unsqueeze(-1)
    if lut.dim() != w.dim() + 2 or any(s != 1 for s in lut.shape[1 : w.dim()]):
        raise ValueError(
            f"{name}: LUT of shape {tuple(lut.shape)} for a weight {tuple(w.shape)}: palette reads "
            "LUTs grouped along the output channels only"
        )
    k, d, groups = lut.shape[-2], lut.shape[-1], lut.shape[0]
    nbits = int(math.log2(k)) if k > 0 else 0
    if 1 << nbits != k or nbits not in NBITS:
        raise ValueError(f"{name}: a LUT of {k} entries is not one of Core ML's palette sizes {NBITS}")
    axis = bufs.get(AXIS)
    if d > 1 and axis is not None and int(axis) != 0:
        raise ValueError(f"{name}: vector_axis {int(axis)}: palette's vectors run along axis 0")
    if w.shape[0] % groups:
        raise ValueError(f"{name}: {groups} LUT groups do not divide {w.shape[0]} output channels")
    per_tensor = groups == 1
    return PaletteSpec(nbits, "per_tensor" if per_tensor else "per_grouped_channel",
                       None if per_tensor else w.shape[0] // groups, d, SCALE in bufs)


def read(module: nn.Module, name: str) -> Palette:
    """The palette a module carries, its indices taken from the weight; a ValueError if the
    weight is no longer exactly that palette (edited after palettizing)."""
    spec = spec_of(module, name)
    w = module.weight.detach()
    lut = module._buffers[LUT].detach().cpu()
    lut = lut.reshape(lut.shape[0], spec.n_entries, spec.cluster_dim)
    if lut.dtype != torch.float16:
        if not torch.equal(lut.half().to(lut.dtype), lut):
            raise ValueError(f"{name}: its LUT ({lut.dtype}) holds values that are not float16")
        lut = lut.half()
    scale = module._buffers.get(SCALE)
    scale = None if scale is None else scale.detach().cpu().reshape(-1).half()
    pal = palette_from_lut(w.cpu(), spec, lut, scale, name=name)
    held = exact_weight(pal).reshape(w.shape).to(w.dtype)
    differ = int((held != w.cpu()).sum())
    if differ:
        raise ValueError(
            f"{name}: its weight is no longer the palette it carries ({differ:,} of {w.numel():,} values "
            "differ): it was changed after palettizing. Palettize it again, or drop the stale palettes "
            "with palette.strip_palettes(model)"
        )
    return pal
