"""Export a torch model to a Core ML `.mlpackage` whose palettized weights are exactly palette's.

coremltools' torch frontend reads compression metadata from buffers named `_COREML_/...` on each
module (converter.py, `_construct_palettization_op`): `compression_type` = [2] (palettization),
`lut` of rank weight.rank + 2 (groups along axis 0, then 2^nbits entries, then cluster_dim),
`vector_axis` = 0, and `palettization_scale` of the weight's rank. It does not take indices: it
re-derives them as the nearest LUT entry to weight / scale. So during export each palettized
weight is set to LUT[indices] * scale computed exactly in fp32 (a product of two fp16 values
fits fp32's significand), which makes weight / scale exactly the LUT entry: the nearest entry
is the palette's own (or an equal-valued duplicate), never a re-clustering. The model's weights
and buffers are restored afterwards, whatever happens.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..cluster import Palette
from ..palettize import keep_original, target_layers
from .chunk import ChunkedExportReport, check_chunk_limit, chunk_mlpackage, chunks_folder
from .recipe_input import RecipeLike, recipe_palettes
from .verify import ExportReport, verify_mlpackage

PALETTIZATION = 2  # coremltools' CompressionType.PALETTIZATION
METADATA_VERSION = 2
PREFIX = "_COREML_"


def exact_fp32_weight(pal: Palette) -> torch.Tensor:
    """LUT[indices] * scale in fp32 without rounding: dividing by the fp16 scale gives the LUT
    entry back exactly, so coremltools' nearest-entry search finds the palette's own index."""
    unscaled = dataclasses.replace(pal, spec=dataclasses.replace(pal.spec, per_channel_scale=False), scale=None)
    w = unscaled.dequantize().float()
    if pal.scale is not None:
        w = w * pal.scale.float().reshape(-1, *[1] * (w.dim() - 1))
    return w


def compression_buffers(pal: Palette, weight_rank: int) -> dict[str, torch.Tensor]:
    """The `_COREML_/weight/...` buffers describing `pal` for a weight of rank `weight_rank`."""
    groups, k, d = pal.lut.shape
    ones = [1] * (weight_rank - 1)
    bufs = {
        "compression_type": torch.tensor([PALETTIZATION]),
        "lut": pal.lut.reshape(groups, *ones, k, d).clone(),
        "vector_axis": torch.tensor(0),
    }
    if pal.scale is not None:
        bufs["palettization_scale"] = pal.scale.reshape(-1, *ones).clone()
    return {f"{PREFIX}/weight/{k}": v for k, v in bufs.items()}


class _Traceable(nn.Module):
    """Wraps a model so that tracing sees tensors only (`.sample`, `last_hidden_state`, ...).

    The last `len(keywords)` traced inputs are passed to the model by those keywords, and
    `constants` (non-tensor keyword inputs) with every call.
    """

    def __init__(
        self, model: nn.Module, keywords: Sequence[str] = (), constants: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.keywords = tuple(keywords)
        self.constants = dict(constants or {})

    def forward(self, *args: torch.Tensor):
        n = len(args) - len(self.keywords)
        out = self.model(*args[:n], **dict(zip(self.keywords, args[n:])), **self.constants)
        if hasattr(out, "to_tuple"):
            out = out.to_tuple()
        if isinstance(out, (tuple, list)) and len(out) == 1:
            out = out[0]
        return out


def save_replacing(mlmodel: Any, path: str | os.PathLike) -> Path:
    """Save `mlmodel` at `path`, replacing whatever package or file was there."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    mlmodel.save(str(path))
    return path


def check_target(palettes: Mapping[str, Palette], target: Any) -> None:
    """Reject what the deployment target cannot store exactly, before any work is done."""
    import coremltools as ct

    if target < ct.target.iOS18:
        raise ValueError(
            f"minimum_deployment_target {target.name} predates iOS18's constexpr_lut_to_dense "
            "(grouped LUTs, vectors, per-channel scales); use ct.target.iOS18 or later"
        )
    if target < ct.target.iOS26:
        bad = [n for n, p in palettes.items() if p.scale is not None and p.spec.cluster_dim > 1]
        if bad:
            raise ValueError(
                f"{len(bad)} layer(s) combine vector palettes with a per-channel scale, e.g. {bad[0]}: "
                "below iOS26 coremltools moves the scale into one LUT per output channel, which a "
                "vector spanning cluster_dim channels cannot use. Use "
                "minimum_deployment_target=ct.target.iOS26, cluster_dim=1, or per_channel_scale=False"
            )


def check_numpy() -> None:
    """coremltools 9.0's torch frontend calls int() on one-element arrays, an error under
    numpy 2.4 when converting a diffusers UNet; fail early and say so (pyproject pins numpy<2.4)."""
    import coremltools as ct

    if ct.__version__ == "9.0" and tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        raise RuntimeError(
            f"coremltools 9.0 cannot convert diffusers models under numpy {np.__version__}; "
            "install numpy<2.4 (pip install 'numpy<2.4')"
        )


def _input_types(model: nn.Module, example_inputs: Sequence[torch.Tensor], keywords: Sequence[str] = ()) -> list:
    import coremltools as ct

    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    names = list(keywords) or (params[: len(example_inputs)] if len(params) >= len(example_inputs) else [])
    types = []
    for i, t in enumerate(example_inputs):
        dtype = np.float32 if t.is_floating_point() else np.int32
        types.append(ct.TensorType(name=names[i] if names else f"input_{i}", shape=tuple(t.shape), dtype=dtype))
    return types


def export_coreml(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, Any],
    recipe: RecipeLike = None,
    minimum_deployment_target: Any = None,
    *,
    verify: bool = True,
    convert_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    max_chunk_bytes: int | None = None,
) -> ExportReport:
    """Trace `model`, convert it with palette's palettes as Core ML LUTs, save to `path`.

    `example_inputs`: positional tensors, or a dict of keyword inputs (diffusion transformers'
    `encoder_hidden_states`, `img_ids`, ...) whose tensor values become the Core ML inputs, named
    by their keys, and whose other values (None, flags, dicts) are passed as they are at tracing.

    `recipe`: a Recipe, {layer: PaletteSpec | None}, a PaletteSpec, fitted {layer: Palette}, or
    None (plain fp16). Target layers the recipe does not palettize stay fp16 consts. Converts
    with compute_precision FLOAT16 and `minimum_deployment_target` (default iOS18);
    `convert_kwargs` go to `ct.convert` (e.g. `inputs`, `outputs`). With `verify` (default) the
    saved package is read back and every weight checked bit for bit; a mismatch raises
    `VerificationError`. The model is left exactly as it was.

    `max_chunk_bytes`: also split the saved program into the fewest chunks whose weights are each
    at most that many bytes (for iOS's per-file memory limit), written with a `manifest.json` to
    `<stem>_chunks/` beside `path` (see `chunk.chunk_mlpackage`); the returned
    `ChunkedExportReport` holds the manifest. A weight alone over the limit is a ValueError
    raised before converting.
    """
    import coremltools as ct

    check_numpy()
    target = ct.target.iOS18 if minimum_deployment_target is None else minimum_deployment_target
    if isinstance(example_inputs, Mapping):
        keywords = [k for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
        constants = {k: v for k, v in example_inputs.items() if k not in keywords}
        inputs = tuple(example_inputs[k] for k in keywords)
    else:
        keywords, constants = [], {}
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    palettes = recipe_palettes(model, recipe, seed=seed)
    check_target(palettes, target)
    if max_chunk_bytes is not None:
        check_chunk_limit(model, palettes, max_chunk_bytes)
    modules = dict(model.named_modules())
    not_fp32 = [n for n in palettes if modules[n].weight.dtype != torch.float32]
    if not_fp32:
        raise ValueError(
            f"{not_fp32[0]} (and {len(not_fp32) - 1} more) have {modules[not_fp32[0]].weight.dtype} "
            "weights; export traces in float32 (call model.float() first, Core ML stores fp16 anyway)"
        )
    kept = {n: m.weight for n, m in target_layers(model).items() if n not in palettes}
    kwargs = {
        "inputs": _input_types(model, inputs, keywords),
        "convert_to": "mlprogram",
        "minimum_deployment_target": target,
        "compute_precision": ct.precision.FLOAT16,
        **(convert_kwargs or {}),
    }
    wrapper = _Traceable(model, keywords, constants).eval()
    registered: list[tuple[nn.Module, str]] = []
    t0 = time.perf_counter()
    with keep_original(model, list(palettes)), torch.no_grad():
        try:
            wrapper.register_buffer(f"{PREFIX}/metadata_version", torch.tensor(METADATA_VERSION))
            for name, pal in palettes.items():
                m = modules[name]
                m.weight.copy_(exact_fp32_weight(pal).reshape(m.weight.shape))
                for key, buf in compression_buffers(pal, m.weight.dim()).items():
                    m.register_buffer(key, buf)
                    registered.append((m, key))
            traced = torch.jit.trace(wrapper, inputs, check_trace=False, strict=False)
            mlmodel = ct.convert(traced, **kwargs)
        finally:
            for m, key in registered:
                del m._buffers[key]
    seconds = {"convert": time.perf_counter() - t0}
    path = save_replacing(mlmodel, path)
    if not verify:
        report = ExportReport(str(path), len(palettes), len(kept), 0, sum(p.nbytes for p in palettes.values()), 0, 0, seconds=seconds)
    else:
        t1 = time.perf_counter()
        report = verify_mlpackage(path, palettes, kept)
        seconds["verify"] = time.perf_counter() - t1
        report.seconds = seconds
    if max_chunk_bytes is None:
        return report
    t2 = time.perf_counter()
    manifest = chunk_mlpackage(path, chunks_folder(path), max_chunk_bytes, verify=verify)
    seconds["chunk"] = time.perf_counter() - t2
    return ChunkedExportReport(**{f.name: getattr(report, f.name) for f in dataclasses.fields(report)}, chunks=manifest)
