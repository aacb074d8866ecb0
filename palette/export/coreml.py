"""Export a torch model to a Core ML `.mlpackage` whose palettized weights are exactly palette's.

The model is converted as it is when it carries its palettes (after `palettize`), exactly as a
user's own `ct.convert(torch.jit.trace(...))` would: coremltools reads each layer's compression
metadata (`palette.metadata`). With a `recipe`, its palettes are put on the model for the
conversion only. Either way the saved package is read back and checked bit for bit, and the
model's weights and buffers are left as they were, whatever happens.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
import warnings
from contextlib import nullcontext
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..chunking import check_chunk_limit
from ..cluster import Palette
from .._jsonio import atomic_path
from ..palettize import dense_lookalikes, palettized, planned_palettes, untouched
from ..recipe import PaletteSpec, Recipe, SpecMapping, target_layers
from .chunk import ChunkedExportReport, chunk_mlpackage, chunks_folder, normalise_manifest
from .verify import ExportReport, verify_mlpackage


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
    """Save `mlmodel` at `path` whole or not at all: written beside it under a temporary name, then
    moved over whatever package was there (`_jsonio.atomic_path`), its Manifest.json normalised."""
    path = Path(path)
    with atomic_path(path, directory=True) as tmp:
        mlmodel.save(str(tmp))
        normalise_manifest(tmp)
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
    recipe: Recipe | PaletteSpec | SpecMapping | None = None,
    minimum_deployment_target: Any = None,
    *,
    verify: bool = True,
    convert_kwargs: Mapping[str, Any] | None = None,
    max_chunk_bytes: int | None = None,
) -> ExportReport:
    """Trace `model`, convert it with palette's palettes as Core ML LUTs, save to `path`.

    `example_inputs`: positional tensors, or a dict of keyword inputs (diffusion transformers'
    `encoder_hidden_states`, `img_ids`, ...) whose tensor values become the Core ML inputs, named
    by their keys, and whose other values (None, flags, dicts) are passed as they are at tracing.

    `recipe`: a Recipe (or a spec or mapping: `Recipe.from_specs`), or None: the palettes the model
    carries (`palettize`, `apply_palettes`), if any; layers that look palettized (few distinct
    values) but carry no palette are exported dense with a warning naming them. Target layers the
    recipe does not palettize stay fp16 consts. Converts
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
    palettes = planned_palettes(model, recipe)
    if recipe is None:
        _warn_lookalikes(model, palettes)
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
    wrapper = _Traceable(model, keywords, constants)
    t0 = time.perf_counter()
    # with a recipe, the model carries exactly its palettes for this conversion only; every module's
    # training flag and buffer is restored afterwards (`untouched`)
    with untouched(model), palettized(model, palettes) if recipe is not None else nullcontext(), torch.no_grad():
        wrapper.eval()
        traced = torch.jit.trace(wrapper, inputs, check_trace=False, strict=False)
        mlmodel = ct.convert(traced, **kwargs)
    seconds = {"convert": time.perf_counter() - t0}
    path = Path(path)
    # written beside `path` under a temporary name and verified there: a package already at `path`
    # is replaced only by a verified one, and an exception or Ctrl-C leaves it as it was
    with atomic_path(path, directory=True) as tmp:
        mlmodel.save(str(tmp))
        normalise_manifest(tmp)
        if not verify:
            report = ExportReport(str(path), len(palettes), len(kept), 0, sum(p.nbytes for p in palettes.values()), 0, 0, seconds=seconds)
        else:
            t1 = time.perf_counter()
            report = verify_mlpackage(tmp, palettes, kept)
            report.path = str(path)
            seconds["verify"] = time.perf_counter() - t1
            report.seconds = seconds
    if max_chunk_bytes is None:
        return report
    t2 = time.perf_counter()
    manifest = chunk_mlpackage(path, chunks_folder(path), max_chunk_bytes, verify=verify)
    seconds["chunk"] = time.perf_counter() - t2
    return ChunkedExportReport(**{f.name: getattr(report, f.name) for f in dataclasses.fields(report)}, chunks=manifest)


def _warn_lookalikes(model: nn.Module, palettes: Mapping[str, Palette]) -> None:
    """Warn, with counts and bytes, about target layers that look palettized but carry no palette."""
    found = dense_lookalikes(model, palettes)
    if found:
        total = sum(nbytes for _, _, nbytes in found)
        listed = ", ".join(f"{n} ({k} values)" for n, k, _ in found[:5])
        warnings.warn(
            f"{len(found)} layer(s) hold at most 256 distinct values but carry no palette, so they are "
            f"exported dense at fp16 ({total:,} B): {listed}{' ...' if len(found) > 5 else ''}. Palettized "
            "by another tool or edited? palettize(model, PaletteSpec(nbits=...)) gives them palettes "
            "(values already on a LUT are kept exactly), or pass recipe=",
            stacklevel=3,
        )
