"""`validate_split_einsum`: check that the split-einsum rewrite is exact and ANE-shaped.

Numerically: run the model as is and rewritten on the same inputs, compare outputs (PSNR as Apple
computes it, max abs error). Structurally: convert both to a Core ML program and, among the ops that
come from attention modules (attributed by the torch module types coremltools records in each MIL
op's scope), count transpose and reshape ops and check that einsum/matmul/softmax stay rank 4.
The model is always left as it was, even if a step fails or is interrupted.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from palette.ane.diffusers_attention import DiffusersUndo
from palette.ane.split_einsum import SplitEinsumState, is_split_einsum, restore_attention, split_einsum
from palette.metrics import psnr
from palette.palettize import untouched

LAYOUT_OPS = ("transpose", "reshape")
ATTENTION_OPS = ("einsum", "matmul", "softmax", "scaled_dot_product_attention")


@dataclass(frozen=True)
class CallInputs:
    """The inputs of one model call: `model(*args, **kwargs)`.

    Built by `CallInputs.of` from a tensor, a tuple or list of positional inputs, a dict of keyword
    inputs, or an (args, kwargs) pair (a tuple or list, then a dict). For tracing, the tensors among
    the top-level values are the traced inputs (`tensors`, named by `names`); everything else
    (None, flags, nested dicts) is passed unchanged to every call.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, inputs: ModelInputs) -> CallInputs:
        if isinstance(inputs, torch.Tensor):
            return cls((inputs,), {})
        if isinstance(inputs, Mapping):
            return cls((), dict(inputs))
        inputs = tuple(inputs)
        if len(inputs) == 2 and isinstance(inputs[0], (tuple, list)) and isinstance(inputs[1], Mapping):
            return cls(tuple(inputs[0]), dict(inputs[1]))
        return cls(inputs, {})

    @property
    def names(self) -> list[str]:
        """Names of the traced inputs: `input_<i>` for positional ones, the keyword otherwise."""
        positional = [f"input_{i}" for i, a in enumerate(self.args) if isinstance(a, torch.Tensor)]
        return positional + [k for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The traced inputs: tensor positional inputs, then tensor keyword inputs, in order."""
        values = [*self.args, *self.kwargs.values()]
        return tuple(v for v in values if isinstance(v, torch.Tensor))

    def call(self, model: nn.Module, tensors: Sequence[torch.Tensor] | None = None) -> object:
        """`model(*args, **kwargs)`, with `tensors` (if given) in place of `self.tensors`."""
        if tensors is None:
            return model(*self.args, **self.kwargs)
        it = iter(tensors)
        args = [next(it) if isinstance(a, torch.Tensor) else a for a in self.args]
        kwargs = {k: next(it) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}
        return model(*args, **kwargs)


ModelInputs = (
    torch.Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any] | tuple[Sequence[Any], Mapping[str, Any]]
)


@dataclass
class ProgramOps:
    """Op counts of one converted Core ML program, overall and inside attention modules."""

    total: Counter[str]
    attention: Counter[str]
    non_rank4: list[str] = field(default_factory=list)  # attention ops (names) with a non-rank-4 tensor

    @property
    def layout_ops(self) -> int:
        """Transpose + reshape ops inside attention modules."""
        return sum(self.attention[op] for op in LAYOUT_OPS)

    @property
    def layout_ops_total(self) -> int:
        """Transpose + reshape ops in the whole program."""
        return sum(self.total[op] for op in LAYOUT_OPS)


@dataclass
class SplitEinsumReport:
    """Outcome of `validate_split_einsum`; `passed` is the acceptance test."""

    variant: str
    chunk_size: int | None
    attention_modules: int
    psnr: float
    max_abs_error: float
    original_ops: ProgramOps | None = None
    rewrite_ops: ProgramOps | None = None
    min_psnr: float = 60.0

    @property
    def passed(self) -> bool:
        """PSNR at least `min_psnr`; if converted: rank-4 attention ops and fewer layout ops."""
        if not self.psnr >= self.min_psnr:
            return False
        if self.original_ops is None or self.rewrite_ops is None:
            return True
        return not self.rewrite_ops.non_rank4 and self.rewrite_ops.layout_ops < self.original_ops.layout_ops

    def __str__(self) -> str:
        lines = [
            f"split-einsum {self.variant} (chunk_size={self.chunk_size}), "
            f"{self.attention_modules} attention modules rewritten",
            f"  PSNR {self.psnr:.1f} dB (need >= {self.min_psnr:.0f}), max abs error {self.max_abs_error:.3g}",
        ]
        if self.original_ops is not None and self.rewrite_ops is not None:
            o, r = self.original_ops, self.rewrite_ops
            for op in LAYOUT_OPS:
                lines.append(f"  {op} in attention: original {o.attention[op]}, rewrite {r.attention[op]}")
            lines.append(
                f"  transpose+reshape in attention: original {o.layout_ops}, rewrite {r.layout_ops}; "
                f"whole program: original {o.layout_ops_total}, rewrite {r.layout_ops_total}"
            )
            lines.append(
                "  attention ops rank 4: "
                + ("yes" if not r.non_rank4 else f"no ({len(r.non_rank4)} ops: {r.non_rank4[:5]})")
            )
        lines.append("  PASSED" if self.passed else "  FAILED")
        return "\n".join(lines)


def validate_split_einsum(
    model: nn.Module,
    inputs: ModelInputs,
    variant: str = "v1",
    chunk_size: int = 512,
    convert: bool = True,
    min_psnr: float = 60.0,
) -> SplitEinsumReport:
    """Compare `model(...)` on `inputs` with its split-einsum rewrite; optionally compare converted programs.

    `inputs`: a tensor, a tuple of positional inputs, a dict of keyword inputs, or an (args, kwargs)
    pair (see `CallInputs`). The first tensor of the output is compared (`.sample` of a UNet or a
    diffusion transformer, `last_hidden_state` of a text encoder). Runs in eval mode without
    gradients; `model` is restored on the way out.
    """
    inputs = CallInputs.of(inputs)
    if is_split_einsum(model):
        raise RuntimeError("validate_split_einsum needs the model as it is, not already rewritten")
    with untouched(model):
        return _validate(model, inputs, variant, chunk_size, convert, min_psnr)


def _validate(model, inputs, variant, chunk_size, convert, min_psnr) -> "SplitEinsumReport":
    with torch.no_grad():
        reference = _first_tensor(inputs.call(model))
    original_ops = None
    state: SplitEinsumState | None = None
    try:
        state = split_einsum(model, variant=variant, chunk_size=chunk_size)
        scopes = _attention_types(state)
        with torch.no_grad():
            output = _first_tensor(inputs.call(model))
        rewrite_ops = _program_ops(model, inputs, scopes) if convert else None
    finally:
        if state is not None:
            restore_attention(model)
    if convert:
        original_ops = _program_ops(model, inputs, scopes)
    return SplitEinsumReport(
        variant=variant,
        chunk_size=state.chunk_size,
        attention_modules=state.count,
        psnr=psnr(output, reference),
        max_abs_error=float((output - reference).abs().max()),
        original_ops=original_ops,
        rewrite_ops=rewrite_ops,
        min_psnr=min_psnr,
    )


def _attention_types(state: SplitEinsumState) -> set[str]:
    """Class names of the attention modules, as they are before and after the rewrite."""
    names = set()
    for undo in state.undo:
        if isinstance(undo, DiffusersUndo):
            names.add(type(undo.attn).__name__)
        else:
            names.add(type(undo.original).__name__)
            names.add(type(getattr(undo.parent, undo.attr)).__name__)
    return names


def _first_tensor(output: object) -> torch.Tensor:
    """The main tensor of a model output: itself, the first field of a ModelOutput, or output[0]."""
    while not isinstance(output, torch.Tensor):
        if isinstance(output, dict):
            output = next(iter(output.values()))
        elif isinstance(output, (tuple, list)):
            output = output[0]
        else:
            raise TypeError(f"cannot find an output tensor in {type(output).__name__}")
    return output


class _FirstOutput(nn.Module):
    """Wraps a model so that tracing sees plain tensor inputs (those of `inputs`) and output."""

    def __init__(self, model: nn.Module, inputs: CallInputs) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return _first_tensor(self.inputs.call(self.model, tensors))


def _program_ops(model: nn.Module, inputs: CallInputs, attention_types: set[str]) -> ProgramOps:
    """Trace and convert `model` (iOS18 mlprogram, not loaded) and count its MIL ops."""
    import coremltools as ct
    from coremltools.converters.mil.mil.scope import ScopeSource

    # Shapes are fixed for conversion, so shape-dependent Python branches are meant to be frozen.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_FirstOutput(model, inputs).eval(), inputs.tensors, check_trace=False)
    ct_inputs = [
        ct.TensorType(
            name=name,
            shape=x.shape,
            dtype=np.int32 if not x.dtype.is_floating_point else np.float32,
        )
        for name, x in zip(inputs.names, inputs.tensors)
    ]
    mlmodel = ct.convert(
        traced,
        inputs=ct_inputs,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
    )
    ops = ProgramOps(Counter(), Counter())
    for op in _walk(mlmodel._mil_program.functions["main"].operations):
        ops.total[op.op_type] += 1
        types = op.scopes.get(ScopeSource.TORCHSCRIPT_MODULE_TYPE, [])
        if not attention_types.intersection(types):
            continue
        ops.attention[op.op_type] += 1
        if op.op_type in ATTENTION_OPS:
            tensors = [*_flatten(op.inputs.values()), *op.outputs]
            ranks = {v.rank for v in tensors if v.val is None}
            if ranks != {4}:
                ops.non_rank4.append(op.name)
    return ops


def _flatten(values: Iterable[object]) -> Iterator[object]:
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from value
        else:
            yield value


def _walk(operations: Iterable) -> Iterator:
    for op in operations:
        yield op
        for block in op.blocks:
            yield from _walk(block.operations)

