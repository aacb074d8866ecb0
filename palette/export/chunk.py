"""Split an exported Core ML program into chunks whose weights each fit under a per-file limit.

iOS maps each model file under a size limit (about 1 GB in practice), so ml-stable-diffusion splits
large UNets into independently loadable pieces (`--chunk-unet`, coremltools' `bisect_model`) that
an app loads one after another. This generalises `bisect_model` from two halves to N chunks: the
main function's non-const ops, in program (topological) order, are cut into the fewest contiguous
pieces whose weights each fit under `max_chunk_bytes` (greedy fill is optimal for contiguous
pieces), with the cuts then placed to make the largest chunk as small as possible (balance). Every
tensor crossing a cut becomes an output of the chunk that computes it and an input, with the same
name, shape and dtype, of each later chunk that reads it (no carrying through: a skip connection
goes straight from its producer to its consumer). Constants (weights; palettized
`constexpr_lut_to_dense` with their indices, LUTs and scales) go with the ops that read them,
untouched, so palettized weights stay palettized. A constant read from several chunks (the converter
deduplicates equal constants, e.g. all-ones norm weights of a fresh model) is copied into each of
them and counted in each; the manifest lists those.

Weight bytes are the stored payload of every constant, as `verify_mlpackage` counts them (blob
sizes from weight.bin headers, immediate values by their proto size); a chunk's weight.bin adds at
most 128 bytes of header and alignment per blob on top.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._jsonio import LoadError, check_header, dict_field, field_of, int_field, list_field, read_json, str_field, write_atomic
from ..chunking import check_limit, too_big
from .verify import ExportReport, VerificationError, _mul16, _stored_sizes, load_program, lut_to_dense

MANIFEST = "manifest.json"
FORMAT = "palette.chunks"
VERSION = 1


# -- planning ----------------------------------------------------------------------------------


@dataclass
class _Layout:
    """The main function seen as a sequence of compute (non-const) ops and the constants each reads."""

    ops: list  # compute ops in program order
    needs: list[frozenset[str]]  # names of the `const` ops each compute op reads (through constexpr ops)
    const_bytes: dict[str, int]  # stored bytes of each `const` op
    weights: dict[str, frozenset[str]]  # const-like op read by a compute op -> the `const` ops it is made of
    producer: dict[str, int]  # var name -> index of the compute op computing it
    readers: dict[str, list[int]]  # var name -> compute ops reading it (len(ops): a model output)
    cuttable: list[bool]  # cuttable[i]: a chunk may start at op i


def _is_const(op) -> bool:
    return op.op_type.startswith("const")  # const and constexpr_* (compressed weights)


def _input_vars(op) -> list:
    out = []
    for v in op.inputs.values():
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


def _const_bytes(op, sizes: Mapping[tuple[str, str], int]) -> int:
    """Stored bytes of a `const` op: its own value, or the immediate input it was loaded from."""
    var = op.outputs[0]
    if (var.name, "val") in sizes:
        return sizes[(var.name, "val")]
    for child in var.child_ops:
        for key, v in child.inputs.items():
            if v is var and (child.outputs[0].name, key) in sizes:
                return sizes[(child.outputs[0].name, key)]
    val = var.val  # not in the proto as such (e.g. one value of a list input): its numpy size
    return int(np.asarray(val).nbytes) if val is not None else 0


def _crossable(var) -> bool:
    """Whether `var` can be a Core ML model input/output: a tensor of static shape, rank >= 1."""
    from coremltools.converters.mil.mil import types

    return (
        types.is_tensor(var.sym_type)
        and len(var.shape) >= 1
        and all(isinstance(d, (int, np.integer)) for d in var.shape)
    )


def _layout(prog, sizes: Mapping[tuple[str, str], int]) -> _Layout:
    block = prog.functions["main"]
    ops = [op for op in block.operations if not _is_const(op)]
    if any(op.blocks for op in ops):
        raise ValueError("programs with control flow (cond/while blocks) cannot be chunked")
    const_bytes: dict[str, int] = {}
    memo: dict[int, frozenset[str]] = {}

    def consts_of(op) -> frozenset[str]:
        if id(op) not in memo:
            if op.op_type == "const":
                const_bytes[op.name] = _const_bytes(op, sizes)
                memo[id(op)] = frozenset([op.name])
            else:
                memo[id(op)] = frozenset().union(*(consts_of(v.op) for v in _input_vars(op)))
        return memo[id(op)]

    producer: dict[str, int] = {}
    computed = {}  # var name -> var, for the vars compute ops produce
    readers: dict[str, list[int]] = defaultdict(list)
    needs = []
    weights: dict[str, frozenset[str]] = {}
    for i, op in enumerate(ops):
        need: set[str] = set()
        for v in _input_vars(op):
            if v.op is not None and _is_const(v.op):
                weights[v.op.name] = consts_of(v.op)
                need |= weights[v.op.name]
            else:
                readers[v.name].append(i)
        needs.append(frozenset(need))
        for v in op.outputs:
            producer[v.name] = i
            computed[v.name] = v
    for v in block.outputs:
        readers[v.name].append(len(ops))
    # A cut before op i is impossible while a non-tensor (or symbolic-shape) var crosses it, i.e.
    # is computed before op i and read at or after it.
    blocked = np.zeros(len(ops) + 2, dtype=np.int64)
    for name, rs in readers.items():
        if name in computed and not _crossable(computed[name]):
            blocked[producer[name] + 1] += 1
            blocked[max(rs) + 1] -= 1
    cuttable = [bool(c == 0) for c in np.cumsum(blocked)[: len(ops)]]
    return _Layout(ops, needs, const_bytes, weights, producer, dict(readers), cuttable)


def _greedy(layout: _Layout, limit: int) -> list[int] | None:
    """Start indices of the fewest chunks under `limit` (each filled as far as it goes), or None."""
    starts = [0]
    seen: set[str] = set()
    total = 0
    for i, need in enumerate(layout.needs):
        new = need - seen
        add = sum(layout.const_bytes[c] for c in new)
        if total + add <= limit:
            seen |= new
            total += add
            continue
        cut = next((c for c in range(i, starts[-1], -1) if layout.cuttable[c]), None)
        if cut is None:
            return None
        starts.append(cut)
        seen = set().union(*layout.needs[cut : i + 1])
        total = sum(layout.const_bytes[c] for c in seen)
        if total > limit:
            return None
    return starts


def _range_bytes(layout: _Layout, a: int, b: int) -> int:
    """Weight bytes of a chunk of compute ops [a, b): each constant they read, once."""
    return sum(layout.const_bytes[c] for c in set().union(*layout.needs[a:b]))


def _chunk_bytes(layout: _Layout, starts: Sequence[int]) -> list[int]:
    ends = list(starts[1:]) + [len(layout.ops)]
    return [_range_bytes(layout, a, b) for a, b in zip(starts, ends)]


def _unsplittable(layout: _Layout, limit: int) -> str:
    """Why no split fits: the largest weight (a palettized one with its LUT and scale), or the ops
    that need more than the limit together."""
    sizes = {n: sum(layout.const_bytes[c] for c in cs) for n, cs in layout.weights.items()}
    name = max(sizes, key=sizes.get, default="")
    if name and sizes[name] > limit:
        return too_big(name, sizes[name], limit)
    worst = max(range(len(layout.ops)), key=lambda i: _range_bytes(layout, i, i + 1))
    op = layout.ops[worst]
    need = _range_bytes(layout, worst, worst + 1)
    if need > limit:
        return (
            f"op {op.name} ({op.op_type}) reads {need:,} B of weights ({', '.join(sorted(layout.needs[worst]))}), "
            f"more than max_chunk_bytes={limit:,} B; raise the limit or palettize that layer to fewer bits"
        )
    return (
        f"no cut fits under max_chunk_bytes={limit:,} B: some ops cannot be separated (a tensor that is "
        "not a static-shape tensor of rank >= 1 crosses every cut between them) and together need more; "
        "raise the limit"
    )


def _plan_chunks(layout: _Layout, max_chunk_bytes: int) -> list[int]:
    """Start indices (into `layout.ops`) of the fewest chunks under the limit, balanced: of all
    splits into that many chunks, one whose largest chunk is smallest."""
    check_limit(max_chunk_bytes)
    starts = _greedy(layout, max_chunk_bytes)
    if starts is None:
        raise ValueError(_unsplittable(layout, max_chunk_bytes))
    n = len(starts)
    lo, hi = 0, max(_chunk_bytes(layout, starts))  # greedy(hi) has n chunks; find the least such limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s = _greedy(layout, mid)
        if s is not None and len(s) <= n:
            hi = mid
        else:
            lo = mid
    best = _greedy(layout, hi)
    assert best is not None and len(best) == n
    return best


# -- manifest ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """A chunk's input or output as Core ML declares it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # Core ML ArrayDataType name: FLOAT16, FLOAT32, INT32


@dataclass(frozen=True)
class ChunkInput(TensorInfo):
    from_chunk: int | None = None  # index of the chunk computing it; None: a model input


@dataclass(frozen=True)
class ChunkOutput(TensorInfo):
    to_chunks: tuple[int, ...] = ()  # later chunks reading it
    model_output: bool = False


@dataclass
class ChunkInfo:
    """One saved chunk: where it is, what it stores, what it reads and writes."""

    path: str  # relative to the manifest's folder
    weight_bytes: int
    weight_file_bytes: int
    n_ops: int
    first_op: str
    last_op: str
    inputs: list[ChunkInput]
    outputs: list[ChunkOutput]


@dataclass
class ChunkManifest:
    """The chunks of one program, in execution order, and how their tensors chain."""

    source: str  # the whole program's mlpackage, relative to the manifest's folder
    max_chunk_bytes: int
    total_weight_bytes: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    chunks: list[ChunkInfo]
    # constants read in several chunks (copied into each): name -> {"bytes": stored bytes, "chunks": [...]}
    shared: dict[str, dict[str, Any]] = field(default_factory=dict)
    folder: str = ""  # where the manifest lives (not saved)
    seconds: dict[str, float] = field(default_factory=dict)  # not saved

    def chunk_paths(self) -> list[Path]:
        return [Path(self.folder) / c.path for c in self.chunks]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["folder"], d["seconds"]
        return {"format": FORMAT, "version": VERSION, **d}

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ChunkManifest":
        """Read `manifest.json` (or the folder holding it); every field is checked, and a damaged
        or hand-broken file is a `LoadError` (a ValueError) naming it."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        d = check_header(read_json(path, "chunk manifest"), FORMAT, VERSION, str(path), "chunk manifest")
        try:
            expected = {"format", "version", "source", "max_chunk_bytes", "total_weight_bytes", "inputs", "outputs",
                        "chunks", "shared"}
            if set(d) != expected:
                raise ValueError(f"unexpected or missing keys: {sorted(map(str, set(d) ^ expected))}")
            chunks = []
            for k, c in enumerate(list_field(d["chunks"], "chunks")):
                c = dict_field(c, f"chunks[{k}]")
                want = {f.name for f in dataclasses.fields(ChunkInfo)}
                if set(c) != want:
                    raise ValueError(f"chunks[{k}]: unexpected or missing keys {sorted(map(str, set(c) ^ want))}")
                chunks.append(ChunkInfo(
                    str_field(c["path"], f"chunks[{k}].path"), int_field(c["weight_bytes"], f"chunks[{k}].weight_bytes"),
                    int_field(c["weight_file_bytes"], f"chunks[{k}].weight_file_bytes"),
                    int_field(c["n_ops"], f"chunks[{k}].n_ops"), str_field(c["first_op"], f"chunks[{k}].first_op"),
                    str_field(c["last_op"], f"chunks[{k}].last_op"),
                    _tensors(c["inputs"], ChunkInput, f"chunks[{k}].inputs"),
                    _tensors(c["outputs"], ChunkOutput, f"chunks[{k}].outputs")))
            shared = dict_field(d["shared"], "shared")
            for n, v in shared.items():
                v = dict_field(v, f"shared[{n!r}]")
                int_field(field_of(v, "bytes", f"shared[{n!r}]"), f"shared[{n!r}].bytes")
                for i in list_field(field_of(v, "chunks", f"shared[{n!r}]"), f"shared[{n!r}].chunks"):
                    int_field(i, f"shared[{n!r}].chunks")
            return cls(
                str_field(d["source"], "source"), int_field(d["max_chunk_bytes"], "max_chunk_bytes", 1),
                int_field(d["total_weight_bytes"], "total_weight_bytes"), _tensors(d["inputs"], TensorInfo, "inputs"),
                _tensors(d["outputs"], TensorInfo, "outputs"), chunks, shared, folder=str(path.parent),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise LoadError(f"{path}: invalid chunk manifest: {e}; export the chunks again") from None

    def summary(self) -> str:
        sizes = ", ".join(f"{c.weight_bytes:,}" for c in self.chunks)
        return (
            f"{len(self.chunks)} chunk(s) under {self.max_chunk_bytes:,} B of weights: {sizes} B "
            f"(of {self.total_weight_bytes:,} B) in {self.folder}"
        )


def _tensors(items: Any, kind: type = TensorInfo, what: str = "tensors") -> list:
    """TensorInfo (or ChunkInput/ChunkOutput) from their JSON dicts, each field checked."""
    out = []
    for k, t in enumerate(list_field(items, what)):
        w = f"{what}[{k}]"
        t = dict_field(t, w)
        want = {f.name for f in dataclasses.fields(kind)}
        if not {"name", "shape", "dtype"} <= set(t) <= want:
            raise ValueError(f"{w}: unexpected or missing keys {sorted(map(str, set(t) ^ want))}")
        t = {**t, "name": str_field(t["name"], f"{w}.name"), "dtype": str_field(t["dtype"], f"{w}.dtype"),
             "shape": tuple(int_field(x, f"{w}.shape") for x in list_field(t["shape"], f"{w}.shape"))}
        if "to_chunks" in t:
            t["to_chunks"] = tuple(int_field(x, f"{w}.to_chunks") for x in list_field(t["to_chunks"], f"{w}.to_chunks"))
        if t.get("from_chunk") is not None:
            int_field(t["from_chunk"], f"{w}.from_chunk")
        if "model_output" in t and not isinstance(t["model_output"], bool):
            raise ValueError(f"{w}.model_output: expected true or false")
        out.append(kind(**t))
    return out


@dataclass
class ChunkedExportReport(ExportReport):
    """`export_coreml`'s report with the chunks written for `max_chunk_bytes`."""

    chunks: ChunkManifest | None = None

    def summary(self) -> str:
        return super().summary() + ("; " + self.chunks.summary() if self.chunks else "")


def _dtype_name(array_type) -> str:
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array_type.dataType)


def _io(features) -> list[TensorInfo]:
    out = []
    for f in features:
        if f.type.WhichOneof("Type") != "multiArrayType":
            raise ValueError(f"{f.name}: only multi-array inputs and outputs can be chained")
        t = f.type.multiArrayType
        out.append(TensorInfo(f.name, tuple(int(s) for s in t.shape), _dtype_name(t)))
    return out


# -- splitting ---------------------------------------------------------------------------------


def chunks_folder(path: str | os.PathLike) -> Path:
    """Where `export_coreml` writes the chunks of `path`: `<stem>_chunks/` beside it."""
    path = Path(path)
    return path.with_name(path.stem + "_chunks")


def chunk_mlpackage(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_chunk_bytes: int,
    *,
    verify: bool = True,
) -> ChunkManifest:
    """Split the saved ML Program `src` into the fewest chunks under `max_chunk_bytes` of weights.

    Writes `<out_dir>/<stem>_chunk<k>.mlpackage` (k from 1, in execution order; a copy of `src`
    when it fits whole) and `<out_dir>/manifest.json`. With `verify` (default), the chunks are read
    back and checked by `verify_chunks`. Raises ValueError naming the weight (or op) that alone is
    over the limit.
    """
    import coremltools as ct

    t0 = time.perf_counter()
    src, out_dir = Path(src), Path(out_dir)
    prog, spec, weights_dir = load_program(src)
    if len(prog.functions) != 1:
        raise ValueError(f"{src}: chunking needs a single-function program, got {list(prog.functions)}")
    layout = _layout(prog, _stored_sizes(spec, weights_dir))
    starts = _plan_chunks(layout, max_chunk_bytes)
    ends = starts[1:] + [len(layout.ops)]
    plan_seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob(f"{src.stem}_chunk*.mlpackage"), out_dir / MANIFEST]:  # a previous split's
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    chunk_of = [k for k, (a, b) in enumerate(zip(starts, ends)) for _ in range(a, b)] + [len(starts)]
    n = len(starts)
    model_inputs, model_outputs = _io(spec.description.input), _io(spec.description.output)
    # Tensors each chunk reads from outside (model inputs or earlier chunks), and the later chunks
    # that read what each chunk computes, both in program order.
    reads: list[dict[str, int | None]] = [{} for _ in range(n)]
    readers_of: list[dict[str, set[int]]] = [defaultdict(set) for _ in range(n)]
    for name, rs in layout.readers.items():
        src_chunk = chunk_of[layout.producer[name]] if name in layout.producer else None
        for r in sorted(rs):
            k = chunk_of[r]
            if k == src_chunk:
                continue
            if src_chunk is not None:
                readers_of[src_chunk][name].add(k)
            if k < n:
                reads[k].setdefault(name, src_chunk)
    if any(t.name not in layout.producer for t in model_outputs):
        raise ValueError(f"{src}: a model output is not computed by an op (an input or a constant)")
    input_rank = {t.name: i - len(model_inputs) for i, t in enumerate(model_inputs)}  # model inputs first
    t1 = time.perf_counter()
    chunks = []
    for k, (a, b) in enumerate(zip(starts, ends)):
        path = out_dir / f"{src.stem}_chunk{k + 1}.mlpackage"
        inputs = sorted(reads[k], key=lambda v: layout.producer.get(v, input_rank.get(v, -1)))
        outputs = sorted(readers_of[k], key=lambda v: layout.producer[v])
        if n == 1:
            shutil.copytree(src, path)
        else:
            ops = {op.name for op in layout.ops[a:b]}
            about = f"chunk {k + 1} of {n} of {src.name}"
            _write_chunk(src, path, ops, inputs, outputs, spec.specificationVersion, about)
        cspec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
        declared_in = {t.name: t for t in _io(cspec.description.input)}
        declared_out = {t.name: t for t in _io(cspec.description.output)}
        chunk_inputs = [ChunkInput(**dataclasses.asdict(declared_in[v]), from_chunk=reads[k][v]) for v in inputs]
        chunk_outputs = [
            ChunkOutput(
                **dataclasses.asdict(declared_out[v]),
                to_chunks=tuple(sorted(c for c in readers_of[k][v] if c < n)),
                model_output=n in readers_of[k][v],
            )
            for v in outputs
        ]
        weight_file = path / "Data/com.apple.CoreML/weights/weight.bin"
        chunks.append(
            ChunkInfo(
                path=path.name,
                weight_bytes=_range_bytes(layout, a, b),
                weight_file_bytes=weight_file.stat().st_size if weight_file.exists() else 0,
                n_ops=b - a,
                first_op=layout.ops[a].name,
                last_op=layout.ops[b - 1].name,
                inputs=chunk_inputs,
                outputs=chunk_outputs,
            )
        )
    const_chunks: dict[str, set[int]] = defaultdict(set)
    for i, need in enumerate(layout.needs):
        for c in need:
            const_chunks[c].add(chunk_of[i])
    manifest = ChunkManifest(
        source=os.path.relpath(src, out_dir),
        max_chunk_bytes=int(max_chunk_bytes),
        total_weight_bytes=sum(layout.const_bytes.values()),
        inputs=model_inputs,
        outputs=model_outputs,
        chunks=chunks,
        shared={
            c: {"bytes": layout.const_bytes[c], "chunks": sorted(ks)}
            for c, ks in sorted(const_chunks.items())
            if len(ks) > 1
        },
        folder=str(out_dir),
    )
    manifest.save(out_dir)
    manifest.seconds = {"plan": plan_seconds, "write": time.perf_counter() - t1}
    if verify:
        t2 = time.perf_counter()
        verify_chunks(out_dir)
        manifest.seconds["verify"] = time.perf_counter() - t2
    return manifest


def _write_chunk(
    src: Path,
    path: Path,
    op_names: set[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    spec_version: int,
    description: str,
) -> None:
    """Cut ops `op_names` out of a fresh copy of `src`'s program: `inputs` become placeholders,
    `outputs` the function's outputs, everything else is dropped; convert and save to `path`."""
    import coremltools as ct
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.converters.mil.mil.program import Placeholder

    prog, _, _ = load_program(src)
    block = prog.functions["main"]
    variables = {v.name: v for op in block.operations for v in op.outputs}
    with block:
        block.outputs.clear()
        block.set_outputs([variables[v] for v in outputs])
        for name in inputs:
            var = variables.get(name)
            if var is None:  # a model input: stays a function input
                continue
            ph = Placeholder(sym_shape=var.shape, dtype=var.dtype, name=name)
            block._input_dict[name] = ph.outputs[0]
            block.function_inputs = tuple(block._input_dict.values())
            block.replace_uses_of_var_after_op(
                anchor_op=None, old_var=var, new_var=ph.outputs[0], force_replace=True
            )
    PASS_REGISTRY["common::dead_code_elimination"](prog)
    block._input_dict = type(block._input_dict)((k, v) for k, v in block._input_dict.items() if v.child_ops)
    block.function_inputs = tuple(block._input_dict.values())
    kept = {op.name for op in block.operations if not _is_const(op)}
    if kept != op_names:
        raise RuntimeError(f"chunk {path.name}: cutting kept {len(kept)} ops instead of {len(op_names)}")
    mlmodel = mil_convert(
        prog,
        convert_from="milinternal",
        convert_to="mlprogram",
        compute_units=ct.ComputeUnit.CPU_ONLY,
        specification_version=spec_version,
        skip_model_load=True,
        pass_pipeline=ct.PassPipeline.EMPTY,
    )
    mlmodel.short_description = description
    mlmodel.save(str(path))
    normalise_manifest(path)


def normalise_manifest(package: str | os.PathLike) -> None:
    """Make a saved mlpackage's Manifest.json the same bytes for the same model: coremltools names
    the items in it with fresh random UUIDs on every save (the files they point to are named by
    role, not by UUID); they are replaced by UUIDs derived from each item's path, so that two
    exports of the same model and recipe are identical byte for byte."""
    import json
    import uuid

    manifest = Path(package) / "Manifest.json"
    if not manifest.exists():
        return
    d = json.loads(manifest.read_text())
    items = d.get("itemInfoEntries")
    if not isinstance(items, dict):
        return
    renamed = {}
    for key, item in items.items():
        path = item.get("path", key) if isinstance(item, dict) else key
        renamed[key] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"palette:{path}")).upper()
    d["itemInfoEntries"] = {renamed[k]: v for k, v in sorted(items.items(), key=lambda kv: renamed[kv[0]])}
    if d.get("rootModelIdentifier") in renamed:
        d["rootModelIdentifier"] = renamed[d["rootModelIdentifier"]]
    manifest.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


# -- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Weight:
    """A constant value read by a compute op: its decompressed content and how it is stored."""

    digest: tuple  # (dtype, shape, sha256 of the decompressed bytes)
    chain: tuple[str, ...]  # op types from the root down (const, constexpr_lut_to_dense, ...)
    readers: int  # distinct compute ops reading it


def _dense(op) -> np.ndarray:
    """The value a const-like op stands for: LUT[indices] (then the scale) for palettized weights."""
    if op.op_type == "const":
        return np.asarray(op.outputs[0].val)
    if op.op_type == "constexpr_lut_to_dense":
        vector_axis = int(op.vector_axis.val) if op.vector_axis is not None else None
        return lut_to_dense(np.asarray(_dense(op.indices.op)), _dense(op.lut.op), vector_axis)
    if op.op_type == "constexpr_blockwise_shift_scale" and op.offset is None:
        return _mul16(_dense(op.data.op), _dense(op.scale.op))
    return np.asarray(op.materialized_val_inference())


def _chain(op) -> tuple[str, ...]:
    if op.op_type == "const":
        return ("const",)
    return (op.op_type, *sorted(t for v in _input_vars(op) for t in _chain(v.op)))


def _weights(prog) -> dict[str, _Weight]:
    """{root const-like op name: _Weight} for every constant value a compute op (or output) reads."""
    block = prog.functions["main"]
    readers: dict[str, set[str]] = defaultdict(set)
    roots = {}
    for op in block.operations:
        if _is_const(op):
            continue
        for v in _input_vars(op):
            if v.op is not None and _is_const(v.op):
                readers[v.op.name].add(op.name)
                roots[v.op.name] = v.op
    out = {}
    for name, op in roots.items():
        val = np.ascontiguousarray(_dense(op))
        digest = (str(val.dtype), val.shape, hashlib.sha256(val.tobytes()).hexdigest())
        out[name] = _Weight(digest, _chain(op), len(readers[name]))
    return out


def _stored_const_bytes(prog, spec, weights_dir) -> int:
    sizes = _stored_sizes(spec, weights_dir)
    return sum(_const_bytes(op, sizes) for op in prog.functions["main"].operations if op.op_type == "const")


def verify_chunks(manifest: str | os.PathLike | ChunkManifest) -> None:
    """Check saved chunks against the whole program they came from; raise VerificationError.

    Every constant value read in the whole program (weights decompressed: LUT[indices], times the
    scale) is in exactly one chunk, bit for bit equal and stored the same way (still palettized),
    except a constant the whole program shares between several ops, which may be in as many chunks
    as ops read it (the manifest's `shared`; with trained weights usually only small shape and
    scalar constants). Nothing is excluded by size: shapes and scalars are checked too. Every compute
    op appears in exactly one chunk; each chunk's weight bytes match the manifest and are under its
    limit; each chunk's declared inputs and outputs match the manifest, and every input is an output
    of the chunk it comes from (or a model input) with the same name, shape and dtype; every model
    output is computed by exactly one chunk, as the whole model declares it.
    """
    m = manifest if isinstance(manifest, ChunkManifest) else ChunkManifest.load(manifest)
    folder = Path(m.folder)
    src = folder / m.source
    prog, spec, weights_dir = load_program(src)
    whole = _weights(prog)
    whole_ops = [op.name for op in prog.functions["main"].operations if not _is_const(op)]
    problems: list[str] = []
    if _io(spec.description.input) != list(m.inputs) or _io(spec.description.output) != list(m.outputs):
        problems.append(f"the manifest's model inputs/outputs differ from {src.name}'s")
    seen_in: dict[str, list[int]] = defaultdict(list)
    op_count: dict[str, int] = defaultdict(int)
    produced: dict[str, tuple[int, TensorInfo]] = {}
    for k, c in enumerate(m.chunks):
        path = folder / c.path
        cprog, cspec, cweights = load_program(path)
        for op in cprog.functions["main"].operations:
            if not _is_const(op):
                op_count[op.name] += 1
        for name, w in _weights(cprog).items():
            seen_in[name].append(k)
            ref = whole.get(name)
            if ref is None:
                problems.append(f"{c.path}: constant {name} is not in the whole program")
            elif ref.digest != w.digest:
                problems.append(f"{c.path}: constant {name} differs from the whole program's")
            elif ref.chain != w.chain:
                problems.append(f"{c.path}: constant {name} is stored as {w.chain}, in the whole program as {ref.chain}")
        nbytes = _stored_const_bytes(cprog, cspec, cweights)
        if nbytes != c.weight_bytes:
            problems.append(f"{c.path}: stores {nbytes:,} B of weights, the manifest says {c.weight_bytes:,} B")
        if nbytes > m.max_chunk_bytes:
            problems.append(f"{c.path}: stores {nbytes:,} B of weights, over the limit {m.max_chunk_bytes:,} B")
        declared_in, declared_out = _io(cspec.description.input), _io(cspec.description.output)
        if declared_in != [TensorInfo(t.name, t.shape, t.dtype) for t in c.inputs]:
            problems.append(f"{c.path}: declared inputs {declared_in} differ from the manifest's")
        if declared_out != [TensorInfo(t.name, t.shape, t.dtype) for t in c.outputs]:
            problems.append(f"{c.path}: declared outputs {declared_out} differ from the manifest's")
        for t in c.inputs:
            want = TensorInfo(t.name, t.shape, t.dtype)
            if t.from_chunk is None:
                ok = want in m.inputs
            else:
                src_out = produced.get(t.name)
                ok = src_out is not None and src_out[0] == t.from_chunk and src_out[1] == want
                if ok:
                    consumers = next(o.to_chunks for o in m.chunks[t.from_chunk].outputs if o.name == t.name)
                    ok = k in consumers
            if not ok:
                origin = "a model input" if t.from_chunk is None else f"an output of chunk {t.from_chunk}"
                problems.append(f"{c.path}: input {want} does not chain to {origin}")
        for t in c.outputs:
            if t.name in produced:
                problems.append(f"{c.path}: output {t.name} is also an output of chunk {produced[t.name][0]}")
            produced[t.name] = (k, TensorInfo(t.name, t.shape, t.dtype))
            if not t.to_chunks and not t.model_output:
                problems.append(f"{c.path}: output {t.name} is read by no later chunk and is no model output")
    for t in m.outputs:
        if t.name not in produced or produced[t.name][1] != t:
            problems.append(f"model output {t} is not an output of any chunk with that shape and dtype")
    missing = [n for n in whole_ops if op_count.get(n) != 1]
    if missing or len(op_count) != len(whole_ops):
        problems.append(f"{len(missing)} op(s) are not in exactly one chunk, e.g. {missing[:5]}")
    absent = [n for n in whole if n not in seen_in]
    if absent:
        problems.append(f"{len(absent)} constant(s) of the whole program are in no chunk, e.g. {absent[:5]}")
    copied = [f"{n} in chunks {seen_in[n]}" for n, w in whole.items() if len(seen_in.get(n, [])) > w.readers]
    if copied:
        problems.append(
            f"{len(copied)} constant(s) are in more chunks than ops read them in the whole program, e.g. {copied[:5]}"
        )
    if problems:
        raise VerificationError(f"{folder}: chunk verification failed:\n  " + "\n  ".join(problems[:50]))
