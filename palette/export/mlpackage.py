"""Apply palette's palettes to an existing fp16 `.mlpackage` (ml-stable-diffusion's flow).

Each palettized torch layer is found among the package's fp16 weight constants by its full
content (sha256 of the fp16 bytes, with output channels and element count), so fine-tunes,
reordered graphs and renamed ops all match, and trailing singleton axes may differ (a Linear
stored as a 1x1 conv). Apple's own script matches on the first value and the element count,
which breaks on fine-tunes (ml-stable-diffusion issue 326). The matched constant is replaced by
a `constexpr_lut_to_dense` (and a `constexpr_blockwise_shift_scale` for per-channel scales)
built from the palette itself, never clustered again; coremltools' default passes then run as in
its own `palettize_weights`, and the result is verified like `export_coreml`'s.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..cluster import Palette
from ..palettize import planned_palettes
from ..recipe import PaletteSpec, Recipe, SpecMapping, target_layers
from .coreml import check_target, save_replacing
from .verify import ExportReport, fingerprint, verify_mlpackage

MIN_LISTED_NUMEL = 2048  # unmatched Core ML consts at least this big are listed in errors


def _core_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` without trailing singleton axes (beyond the first)."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _lut_ops(pal: Palette, shape: tuple[int, ...], before_op, name: str):
    """Build the palette's constexpr ops for a weight const of Core ML `shape` before `before_op`."""
    from coremltools.converters.mil.frontend import _utils as frontend_utils
    from coremltools.converters.mil.mil import Builder as mb

    groups, k, d = pal.lut.shape
    ones = [1] * (len(shape) - 1)
    indices = pal.indices.numpy().reshape(shape[0] // d, *shape[1:])
    lut = pal.lut.numpy().reshape(groups, *ones, k, d)
    var = frontend_utils._construct_constexpr_lut_op(
        indices, lut, np.int32(0), name=name + "_palettized", before_op=before_op
    )
    if pal.scale is not None:
        var = mb.constexpr_blockwise_shift_scale(
            data=var,
            scale=pal.scale.numpy().reshape(-1, *ones),
            offset=None,
            before_op=before_op,
            name=name + "_palettized_pcs",
        )
    return var


class _ApplyPalettes:
    """Graph pass: replace the fp16 consts that equal palettized layers by the palettes' ops."""

    def __init__(self, palettes: Mapping[str, Palette], prints: Mapping[str, tuple]) -> None:
        self.palettes = palettes
        self.prints = prints  # layer -> fingerprint of its fp16 torch weight
        self.matched: dict[str, list[str]] = {}

    def __call__(self, prog) -> None:
        from coremltools.converters.mil.mil.passes.helper import block_context_manager

        block = prog.functions["main"]
        consts = defaultdict(list)
        for op in block.operations:
            val = op.outputs[0].val if op.op_type == "const" else None
            if isinstance(val, np.ndarray) and val.dtype == np.float16 and val.ndim >= 2:
                consts[fingerprint(val)].append(op)
        by_print: dict[tuple, list[str]] = defaultdict(list)
        for name in self.palettes:
            by_print[self.prints[name]].append(name)
        self._check(by_print, consts)

        @block_context_manager
        def rewrite(block):
            for fp, names in by_print.items():
                pal = self.palettes[names[0]]
                for op in consts[fp]:
                    shape = tuple(op.outputs[0].shape)
                    new_var = _lut_ops(pal, shape, op, op.name)
                    block.replace_uses_of_var_after_op(
                        anchor_op=op, old_var=op.outputs[0], new_var=new_var, no_check_var_types=True
                    )
                    block.remove_ops([op])
                    for n in names:
                        self.matched.setdefault(n, []).append(op.name)

        rewrite(block)

    def _check(self, by_print: Mapping[tuple, list[str]], consts: Mapping[tuple, list]) -> None:
        problems = []
        for fp, names in by_print.items():
            first = self.palettes[names[0]]
            for other in names[1:]:  # equal weights: fine only if their palettes agree too
                if not torch.equal(self.palettes[other].dequantize(), first.dequantize()):
                    problems.append(f"{names[0]} and {other} have equal weights but different palettes")
            if fp not in consts:
                problems += [f"{n}: no fp16 const equals its weight {first.shape}" for n in names]
                continue
            for op in consts[fp]:
                if _core_shape(op.outputs[0].shape) != _core_shape(first.shape):
                    problems.append(f"{names[0]}: content matches {op.name} but shape {op.outputs[0].shape} != {first.shape}")
        if problems:
            wanted = set(by_print)
            spare = [
                f"{ops[0].name} {tuple(ops[0].outputs[0].shape)}"
                for fp, ops in consts.items()
                if fp not in wanted and fp[1] >= MIN_LISTED_NUMEL
            ]
            raise ValueError(
                f"{len(problems)} palettized layer(s) could not be matched to the mlpackage's weights "
                "(is it converted from this very checkpoint, in fp16, without fused weights?):\n  "
                + "\n  ".join(problems)
                + f"\nfp16 weight consts no palettized layer matched ({len(spare)}): "
                + ", ".join(spare[:20])
                + (" ..." if len(spare) > 20 else "")
            )


def palettize_mlpackage(
    src: str | os.PathLike,
    recipe: Recipe | PaletteSpec | SpecMapping | None,
    torch_model: nn.Module,
    dst: str | os.PathLike,
    *,
    verify: bool = True,
) -> ExportReport:
    """Write `dst`: the fp16 mlpackage `src` with `recipe`'s layers of `torch_model` palettized.

    `recipe` is as for `export_coreml`: its palettes are fitted on `torch_model`'s weights (None:
    the palettes `torch_model` carries). Every palettized layer must match a weight of `src` by
    content and shape, or a ValueError lists what did not match. `src` must target iOS18 or
    later. With `verify`, `dst` is read back and checked bit for bit.
    """
    import coremltools as ct
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass

    palettes = planned_palettes(torch_model, recipe)
    mlmodel = ct.models.MLModel(str(src), skip_model_load=True)
    version = mlmodel.get_spec().specificationVersion
    if version < ct.target.iOS18.value:
        raise ValueError(
            f"{src}: specification version {version} is older than iOS18 ({ct.target.iOS18.value}); "
            "convert the fp16 model with minimum_deployment_target=ct.target.iOS18 or later"
        )
    check_target(palettes, ct.target(version))
    modules = dict(torch_model.named_modules())
    weights16 = {n: m.weight.detach().to(torch.float16).cpu().numpy() for n, m in target_layers(torch_model).items()}
    prints = {n: fingerprint(w) for n, w in weights16.items()}
    rewrite = _ApplyPalettes(palettes, prints)

    class _Pass(AbstractGraphPass):
        def apply(self, prog) -> None:
            rewrite(prog)

    t0 = time.perf_counter()
    out = _apply_graph_pass(mlmodel, _Pass(), spec_version=version, skip_model_load=True)
    seconds = {"convert": time.perf_counter() - t0}
    dst = save_replacing(out, dst)
    if not verify:
        return ExportReport(str(dst), len(palettes), 0, 0, sum(p.nbytes for p in palettes.values()), 0, 0, seconds=seconds)
    # Kept layers are checked where `src` held them as plain fp16 consts.
    src_consts = _src_prints(src)
    kept = {n: modules[n].weight for n in weights16 if n not in palettes and prints[n] in src_consts}
    t1 = time.perf_counter()
    report = verify_mlpackage(dst, palettes, kept)
    seconds["verify"] = time.perf_counter() - t1
    report.seconds = seconds
    return report


def _src_prints(src: str | os.PathLike) -> set[tuple]:
    from .verify import load_program

    prog, _, _ = load_program(src)
    return {
        fingerprint(op.outputs[0].val)
        for op in prog.functions["main"].operations
        if op.op_type == "const"
        and isinstance(op.outputs[0].val, np.ndarray)
        and op.outputs[0].val.dtype == np.float16
        and op.outputs[0].val.ndim >= 2
    }
