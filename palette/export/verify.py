"""Read a saved `.mlpackage` back and check that its palettized weights are exactly palette's.

The program is loaded from the package's proto and weight blobs (coremltools' milproto loader, so
no Core ML runtime is needed), every `constexpr_lut_to_dense` is decompressed here in numpy
(LUT[indices], then the per-channel scale in fp16) and compared bit for bit with
`Palette.dequantize()`. Weights are matched by content (a hash of their fp16 bytes plus output
channels and element count), so the check does not depend on op names; names are used only to
explain a mismatch. Stored bytes come from the blob headers in weight.bin.

Two layouts of a scaled palette are accepted, because coremltools' `canonicalize_quantized_lut_pattern`
pass rewrites one into the other below iOS 26:
  LUT-first:   lut -> constexpr_lut_to_dense -> constexpr_blockwise_shift_scale(scale)
  scale-first: lut (one per output channel) -> constexpr_blockwise_shift_scale(scale) -> constexpr_lut_to_dense
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._jsonio import LoadError
from ..cluster import Palette

BLOB_SENTINEL = 0xDEADBEEF
# Payload bytes per item of an immediate (in-proto) tensor value; fp16 and sub-byte are `bytes`.
IMMEDIATE_ITEM_BYTES = {"floats": 4, "ints": 4, "bools": 1, "longInts": 8, "doubles": 8}


class VerificationError(ValueError):
    """The saved model does not hold exactly the weights palette computed."""


@dataclass(frozen=True)
class LayerBytes:
    """Stored versus predicted bytes of one palettized layer."""

    name: str
    label: str
    shape: tuple[int, ...]
    stored: int
    predicted: int


@dataclass
class ExportReport:
    """What an export wrote and what verification found."""

    path: str
    n_palettized: int
    n_kept: int
    stored_palettized_bytes: int
    predicted_palettized_bytes: int
    stored_kept_bytes: int
    weight_file_bytes: int
    layers: list[LayerBytes] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        """Stored / predicted bytes of the palettized layers (1.0 when nothing is palettized)."""
        if not self.predicted_palettized_bytes:
            return 1.0
        return self.stored_palettized_bytes / self.predicted_palettized_bytes

    def summary(self) -> str:
        times = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return (
            f"{self.path}: {self.n_palettized} palettized layer(s) verified bit-exact, "
            f"{self.n_kept} kept at fp16; palettized weights stored {self.stored_palettized_bytes:,} B "
            f"vs predicted {self.predicted_palettized_bytes:,} B ({100 * (self.size_ratio - 1):+.2f}%); "
            f"fp16 kept layers {self.stored_kept_bytes:,} B; weight.bin {self.weight_file_bytes:,} B"
            + (f"; {times}" if times else "")
        )


def fingerprint(values: np.ndarray) -> tuple[int, int, str]:
    """(output channels, element count, sha256 of the fp16 bytes): identity of a weight tensor,
    independent of trailing singleton axes (a Linear stored as a 1x1 conv matches)."""
    v = np.ascontiguousarray(values, dtype=np.float16)
    out = int(v.shape[0]) if v.ndim else 1
    return out, int(v.size), hashlib.sha256(v.tobytes()).hexdigest()


def sanitized(name: str) -> str:
    """How coremltools' torch frontend names the const of parameter `name` (dots to underscores)."""
    return name.replace(".", "_")


def _blob_size(weights_dir: Path, file_name: str, offset: int, cache: dict) -> int:
    path = weights_dir / os.path.basename(file_name)
    if path not in cache:
        cache[path] = path.read_bytes()
    data = cache[path]
    sentinel, _dtype, size = struct.unpack_from("<IIQ", data, offset)
    if sentinel != BLOB_SENTINEL:
        raise VerificationError(f"{path}: no blob header at offset {offset}")
    return size


def _value_bytes(value, weights_dir: Path, cache: dict) -> int:
    kind = value.WhichOneof("value")
    if kind == "blobFileValue":
        return _blob_size(weights_dir, value.blobFileValue.fileName, value.blobFileValue.offset, cache)
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    if kind is None:
        return 0
    values = getattr(tensor, kind).values
    if kind == "bytes":
        return len(values)
    if kind == "strings":
        return sum(len(s) for s in values)
    return len(values) * IMMEDIATE_ITEM_BYTES[kind]


def _stored_sizes(spec, weights_dir: Path) -> dict[tuple[str, str], int]:
    """{(op output name, input or 'val'): stored bytes} for every constant in the main function."""
    cache: dict = {}
    sizes: dict[tuple[str, str], int] = {}
    func = spec.mlProgram.functions["main"]
    for op in func.block_specializations[func.opset].operations:
        out = op.outputs[0].name if op.outputs else ""
        if op.type == "const":
            sizes[(out, "val")] = _value_bytes(op.attributes["val"], weights_dir, cache)
        for key, arg in op.inputs.items():
            for a in arg.arguments:
                if a.WhichOneof("binding") == "value":
                    sizes[(out, key)] = _value_bytes(a.value, weights_dir, cache)
    return sizes


def load_program(path: str | os.PathLike):
    """(MIL program, model spec, weights dir) of a saved mlpackage, without a Core ML runtime."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    if not Path(path).is_dir() or not (Path(path) / "Manifest.json").is_file():
        raise LoadError(f"{path}: not an mlpackage (a folder with a Manifest.json); export it again")
    try:
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
        spec = mlmodel.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise LoadError(f"{path}: not an ML Program (got {spec.WhichOneof('Type')}); convert with convert_to='mlprogram'")
        weights_dir = Path(mlmodel.weights_dir)
        prog = milproto_load(spec, spec.specificationVersion, str(weights_dir))
    except LoadError:
        raise
    except Exception as e:  # noqa: BLE001 -- coremltools' and protobuf's errors for a damaged package
        first = (str(e).splitlines() or [""])[0][:200]
        raise LoadError(f"{path}: damaged mlpackage ({type(e).__name__}: {first}); export it again") from None
    return prog, spec, weights_dir


def _mul16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """fp16 product as Core ML computes it: exact in fp32 (11-bit significands), rounded once."""
    return (a.astype(np.float32) * b.astype(np.float32)).astype(np.float16)


def lut_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    """Decompress `constexpr_lut_to_dense` (iOS 18): block-wise LUTs, vectors along `vector_axis`."""
    d = lut.shape[-1]
    lut_blocks = lut.shape[: indices.ndim]
    if any(n % b for n, b in zip(indices.shape, lut_blocks)):
        raise VerificationError(f"LUT blocks {lut_blocks} do not divide indices {indices.shape}")
    # Expand every LUT block over the index positions it covers.
    expanded = lut
    for axis, (n, b) in enumerate(zip(indices.shape, lut_blocks)):
        expanded = np.repeat(expanded, n // b, axis=axis)
    vals = np.take_along_axis(expanded, indices.astype(np.int64)[..., None, None], axis=-2)[..., 0, :]
    if d == 1:
        return vals[..., 0]
    axis = vector_axis % indices.ndim
    vals = np.moveaxis(vals, axis, -2)  # (..., n_axis, ..., d) -> vectors fill the axis in order
    shape = list(vals.shape[:-2]) + [vals.shape[-2] * d]
    return np.moveaxis(vals.reshape(shape), -1, axis)


@dataclass
class StoredWeight:
    """One decompressed palettized weight found in the program."""

    names: tuple[str, ...]  # op names along its chain (for diagnostics)
    dense: np.ndarray  # fp16
    lut: np.ndarray  # the LUT as stored in the LUT op (scale-first: the per-channel LUT before scaling)
    scale: np.ndarray | None
    scale_first: bool
    stored_bytes: int


def _val(var, what: str) -> np.ndarray:
    if var.val is None:
        raise VerificationError(f"{var.name}: {what} is not a constant")
    return np.asarray(var.val)


def palettized_weights(prog, sizes: Mapping[tuple[str, str], int]) -> list[StoredWeight]:
    """Every `constexpr_lut_to_dense` in the main function, decompressed with its scale."""
    found = []
    for op in prog.functions["main"].operations:
        if op.op_type != "constexpr_lut_to_dense":
            continue
        name = op.outputs[0].name
        indices = _val(op.indices, "indices")
        vector_axis = int(op.vector_axis.val) if op.vector_axis is not None else None
        stored = sizes.get((name, "indices"), 0)
        names = [name]
        scale = None
        lut_op = op.lut.op
        if lut_op is not None and lut_op.op_type == "constexpr_blockwise_shift_scale":
            if lut_op.offset is not None:
                raise VerificationError(f"{lut_op.name}: an offset on a palette LUT is not palette's format")
            lut = _val(lut_op.data, "LUT")
            scale = _val(lut_op.scale, "scale")
            effective = _mul16(lut, scale)
            stored += sizes.get((lut_op.outputs[0].name, "data"), 0) + sizes.get((lut_op.outputs[0].name, "scale"), 0)
            names.append(lut_op.name)
            dense = lut_to_dense(indices, effective, vector_axis)
            scale_first = True
        else:
            lut = _val(op.lut, "LUT")
            stored += sizes.get((name, "lut"), 0)
            dense = lut_to_dense(indices, lut, vector_axis)
            scale_first = False
            children = op.outputs[0].child_ops
            if len(children) == 1 and children[0].op_type == "constexpr_blockwise_shift_scale":
                child = children[0]
                if child.offset is not None:
                    raise VerificationError(f"{child.name}: an offset on a palettized weight is not palette's format")
                scale = _val(child.scale, "scale")
                dense = _mul16(dense, scale)
                stored += sizes.get((child.outputs[0].name, "scale"), 0)
                names.append(child.name)
        found.append(StoredWeight(tuple(names), dense.astype(np.float16), lut, scale, scale_first, stored))
    return found


def plain_fp16_consts(prog, sizes: Mapping[tuple[str, str], int]) -> dict[tuple, tuple[str, int]]:
    """{fingerprint: (const name, stored bytes)} of the fp16 tensor constants of rank >= 2."""
    out = {}
    for op in prog.functions["main"].operations:
        if op.op_type != "const":
            continue
        val = op.outputs[0].val
        if isinstance(val, np.ndarray) and val.dtype == np.float16 and val.ndim >= 2:
            out[fingerprint(val)] = (op.name, sizes.get((op.outputs[0].name, "val"), val.nbytes))
    return out


def _check_lut_and_scale(name: str, pal: Palette, sw: StoredWeight) -> list[str]:
    """Problems, if any, with the stored LUT and scale against the palette's own."""
    groups, k, d = pal.lut.shape
    lut = np.asarray(sw.lut, dtype=np.float16).reshape(-1, k, d)
    want = pal.lut.numpy()
    if sw.scale_first:  # one LUT per row of indices, each a copy of its group's LUT
        want = np.repeat(want, lut.shape[0] // groups, axis=0) if lut.shape[0] % groups == 0 else None
    problems = []
    if want is None or want.shape != lut.shape or want.view(np.uint16).tobytes() != lut.view(np.uint16).tobytes():
        problems.append(f"{name}: stored LUT {tuple(sw.lut.shape)} is not palette's LUT {tuple(pal.lut.shape)}")
    want_scale = None if pal.scale is None else pal.scale.numpy()
    got_scale = None if sw.scale is None else np.asarray(sw.scale, dtype=np.float16).reshape(-1)
    if (want_scale is None) != (got_scale is None) or (
        want_scale is not None and want_scale.view(np.uint16).tobytes() != got_scale.view(np.uint16).tobytes()
    ):
        problems.append(f"{name}: stored per-channel scale differs from palette's")
    return problems


def verify_mlpackage(
    path: str | os.PathLike,
    palettes: Mapping[str, Palette],
    kept: Mapping[str, torch.Tensor] | None = None,
) -> ExportReport:
    """Check a saved mlpackage against `palettes` (and `kept` fp16 weights); raise on any mismatch.

    Every palette must appear as exactly one `constexpr_lut_to_dense` whose decompressed value
    equals `Palette.dequantize()` bit for bit and whose LUT (and scale) are the palette's; there
    must be no other palettized weight; every `kept` weight must appear as a plain fp16 const
    equal to `weight.half()`.
    """
    prog, spec, weights_dir = load_program(path)
    try:
        sizes = _stored_sizes(spec, weights_dir)
    except (OSError, struct.error, KeyError, IndexError) as e:
        raise LoadError(f"{path}: damaged mlpackage (its weights cannot be read: {type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]}); export it again") from None
    stored = palettized_weights(prog, sizes)
    by_print: dict[tuple, list[int]] = defaultdict(list)
    for i, sw in enumerate(stored):
        by_print[fingerprint(sw.dense)].append(i)

    problems: list[str] = []
    used: set[int] = set()
    layers = []
    for name, pal in palettes.items():
        want = pal.dequantize().numpy()
        hits = [i for i in by_print.get(fingerprint(want), []) if i not in used]
        if not hits:
            problems.append(_explain_missing(name, want, stored))
            continue
        i = hits[0]
        used.add(i)
        problems += _check_lut_and_scale(name, pal, stored[i])
        layers.append(LayerBytes(name, pal.spec.label, pal.shape, stored[i].stored_bytes, pal.nbytes))
    extra = [stored[i].names[0] for i in range(len(stored)) if i not in used]
    if extra:
        problems.append(
            f"{len(extra)} palettized weight(s) in the model that the recipe does not palettize: {extra[:10]}"
        )
    kept_bytes = 0
    if kept:
        consts = plain_fp16_consts(prog, sizes)
        for name, w in kept.items():
            hit = consts.get(fingerprint(w.detach().to(torch.float16).cpu().numpy()))
            if hit is None:
                problems.append(
                    f"{name}: kept at 16 bits but no fp16 const equals its weight "
                    "(was it palettized, or rewritten by a graph pass?)"
                )
            else:
                kept_bytes += hit[1]
    if problems:
        raise VerificationError(f"{path}: verification failed:\n  " + "\n  ".join(problems))
    weight_file = weights_dir / "weight.bin"
    return ExportReport(
        path=str(path),
        n_palettized=len(stored),
        n_kept=len(kept or {}),
        stored_palettized_bytes=sum(lb.stored for lb in layers),
        predicted_palettized_bytes=sum(lb.predicted for lb in layers),
        stored_kept_bytes=kept_bytes,
        weight_file_bytes=weight_file.stat().st_size if weight_file.exists() else 0,
        layers=layers,
    )


def _explain_missing(name: str, want: np.ndarray, stored: list[StoredWeight]) -> str:
    """Why layer `name` has no bit-exact palettized weight: a name match that differs, or none."""
    key = sanitized(name)
    for sw in stored:
        if any(re.search(rf"(^|_){re.escape(key)}_weight(_\d+)?$", n) for n in sw.names):
            if sw.dense.size != want.size:
                return f"{name}: stored as {sw.names[0]} with {sw.dense.size} values, expected {want.size}"
            a = sw.dense.reshape(-1).view(np.uint16)
            b = np.ascontiguousarray(want, dtype=np.float16).reshape(-1).view(np.uint16)
            diff = int((a != b).sum())
            return f"{name}: stored as {sw.names[0]} but {diff} of {want.size} values differ from the palette"
    return f"{name}: no constexpr_lut_to_dense holds its palette ({math.prod(want.shape)} values)"
