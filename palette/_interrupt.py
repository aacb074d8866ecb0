"""Ctrl-C at a safe point: SIGINT is deferred while numba kernels, faiss or autograd's backward run
(an interrupt raised inside them surfaces as a `SystemError` from numba's dispatcher, or tears
down native threads mid-call), and raised as KeyboardInterrupt once they return, or at the next
`checkpoint()` between layers or probe units, so that the `untouched` / `keep_original` context
managers and the atomic writers can restore the model and remove partial files.

The handler is installed only in the main thread (the only one Python delivers signals to) and
only while a `deferred()` block runs; elsewhere nothing changes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"depth": 0, "pending": False, "previous": None}


def _handler(signum, frame) -> None:  # noqa: ARG001
    _state["pending"] = True


@contextmanager
def deferred() -> Iterator[None]:
    """Defer SIGINT for the block; a Ctrl-C that arrived in it is raised as KeyboardInterrupt on
    leaving the outermost block (or earlier, at a `checkpoint()`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = _state["depth"] == 0
    if outer:
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:  # a user's own handler (or SIG_IGN): keep it
            yield
            return
        _state["previous"] = previous
        _state["pending"] = False
        signal.signal(signal.SIGINT, _handler)
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if outer:
            signal.signal(signal.SIGINT, _state["previous"])
            if _state["pending"]:
                _state["pending"] = False
                raise KeyboardInterrupt


def checkpoint() -> None:
    """A safe point: raise the KeyboardInterrupt of a Ctrl-C received in the enclosing `deferred()`."""
    if _state["pending"]:
        _state["pending"] = False
        raise KeyboardInterrupt


def pending() -> bool:
    return bool(_state["pending"])
