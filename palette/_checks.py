"""Type and range checks at palette's boundaries (specs, budgets, probe options, loaded models):
done once, where a value enters, with a message naming the field (and the layer, when known).

Numpy integers and booleans are accepted and converted to Python ones (they come out of arrays
and hand-built configs); floats are never taken for integers (`nbits=4.0` is refused, not
truncated), and booleans are never taken for numbers.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import nn


def _where(field: str, layer: str | None) -> str:
    return f"{layer}: {field}" if layer else field


def integer(x: Any, field: str, *, layer: str | None = None, minimum: int | None = None) -> int:
    """`x` as a Python int (numpy integers converted); a ValueError naming `field` for a float, a
    bool, a string or anything else, or for a value below `minimum`."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{_where(field, layer)} must be an integer, got {x!r} ({type(x).__name__})")
    x = int(x)
    if minimum is not None and x < minimum:
        raise ValueError(f"{_where(field, layer)} must be >= {minimum}, got {x}")
    return x


def boolean(x: Any, field: str, *, layer: str | None = None) -> bool:
    """`x` as a Python bool (numpy bools converted); a ValueError naming `field` otherwise."""
    if isinstance(x, bool):
        return x
    try:
        import numpy as np

        if isinstance(x, np.bool_):
            return bool(x)
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"{_where(field, layer)} must be True or False, got {x!r} ({type(x).__name__})")


def number(x: Any, field: str, *, layer: str | None = None, positive: bool = False) -> float:
    """`x` as a finite Python float (ints and numpy numbers converted); a ValueError naming `field`
    for a bool, a string, NaN or an infinity, or (with `positive`) a value <= 0."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{_where(field, layer)} must be a number, got {x!r} ({type(x).__name__})")
    try:
        f = float(x)
    except OverflowError:
        raise ValueError(f"{_where(field, layer)} is out of a float's range") from None
    if not math.isfinite(f):
        raise ValueError(f"{_where(field, layer)} must be finite, got {x!r}")
    if positive and f <= 0:
        raise ValueError(f"{_where(field, layer)} must be a positive number, got {x!r}")
    return f


def check_loaded(model: nn.Module) -> None:
    """A clear error for a model whose weights are not loaded (on the `meta` device: built with
    `init_empty_weights`, `device_map="meta"` or `low_cpu_mem_usage` without its checkpoint)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(model).__name__}")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{type(model).__name__}: the weights are not loaded ({len(meta)} tensor(s) on the 'meta' "
            f"device, e.g. {meta[0]}); load the checkpoint (or call model.to_empty(...) and load a "
            "state_dict) before palettizing or probing"
        )
