"""Files that are written whole or not at all, and read with a clear error when damaged.

Writers go through `atomic_path`: the content is written to a uniquely named temporary file (or
directory) beside the target and renamed over it only once complete, so that an exception or
Ctrl-C leaves either the old file or the new one, never half of one, and never touches a user's
own `NAME.tmp`. Readers turn every way a file can be damaged (not UTF-8, not JSON, nested too
deeply, NaN/Infinity, numbers out of range, the wrong types) into `LoadError`, a ValueError that
names the file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._checks import number

MAX_INT = 1 << 63  # counts and sizes in palette's files fit in int64
MAX_DEPTH = 64  # palette's own files nest a few levels


class LoadError(ValueError):
    """A file palette was asked to read is damaged, edited into something invalid, or not the kind
    of file expected. The message names the file and says what to do. A ValueError, so that code
    catching ValueError for bad input catches it too."""


def check_target(path: str | os.PathLike, *, directory: bool = False) -> Path:
    """The output `path`, refused with a ValueError where it cannot be written: a directory where a
    file goes (or, with `directory`, a file where a directory goes), or a missing parent folder."""
    path = Path(path)
    if not directory and path.is_dir():
        raise ValueError(f"{path}: is a directory; give a file name to write")
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{path}: is an existing file; give a directory name to write")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: its folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{path}: its folder {parent} is not writable")
    return path


@contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """A uniquely named temporary path beside `target` to write to; on success it replaces
    `target` (a file with `os.replace`; with `directory`, a directory moved into place after the
    old one is moved aside), on any failure (Ctrl-C included) it is removed and `target` is left
    as it was."""
    target = check_target(target, directory=directory)
    prefix = f".{target.name}."
    if directory:
        # the target's own suffix last: coremltools saves an ML Program only as NAME.mlpackage
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial" + target.suffix, dir=target.parent))
        shutil.rmtree(tmp)  # the writer creates it (coremltools refuses an existing package)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            replace_dir(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        remove(tmp)
        raise


def replace_dir(src: Path, target: Path) -> None:
    """Move the directory `src` to `target`, replacing a previous one only once `src` is complete;
    the previous one is removed after the move (restored if the move fails)."""
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        old.rmdir()
        os.replace(target, old)
        try:
            os.replace(src, target)
        except BaseException:
            os.replace(old, target)
            raise
        remove(old)
    else:
        os.replace(src, target)


def remove(path: Path) -> None:
    """Remove a file or directory if it exists (errors ignored: best effort clean-up)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number palette accepts")


def _float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:40]} is out of range")
    return x


def _int(text: str) -> int:
    x = int(text)
    if abs(x) >= MAX_INT:
        raise ValueError(f"integer {text[:40]} is out of range")
    return x


def _depth(x: Any, limit: int = MAX_DEPTH) -> int:
    stack = [(x, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            raise ValueError(f"nested more than {limit} levels deep")
        if isinstance(v, dict):
            stack.extend((c, d + 1) for c in v.values())
        elif isinstance(v, list):
            stack.extend((c, d + 1) for c in v)
    return 0


def loads_json(data: str | bytes, where: str, what: str, hint: str = "") -> Any:
    """Parse JSON strictly: UTF-8 only, no NaN/Infinity, finite floats, int64-range integers,
    bounded nesting; any problem is a LoadError naming `where` as a damaged `what` file."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
        _depth(value)
        return value
    except UnicodeDecodeError:
        reason = "not UTF-8 text"
    except RecursionError:
        reason = "nested too deeply"
    except json.JSONDecodeError as e:
        reason = f"not valid JSON: {e}"
    except ValueError as e:
        reason = str(e)
    raise LoadError(f"{where}: corrupt {what} file ({reason}){hint}")


def read_json(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """`loads_json` of the file at `path` (a directory or an unreadable file is a LoadError)."""
    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{path}: is a directory, not a {what} file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise LoadError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    return loads_json(data, str(path), what, hint)


def check_header(d: Any, fmt: str, version: int, where: str, what: str) -> dict:
    """`d` as a dict whose `format` is `fmt` and `version` is `version`, else a LoadError."""
    if not isinstance(d, dict):
        raise LoadError(f"{where}: not a {what} file (expected a JSON object, got {type(d).__name__})")
    if d.get("format") != fmt:
        raise LoadError(f"{where}: not a {what} file (format {d.get('format')!r}, expected {fmt!r})")
    if d.get("version") != version or isinstance(d.get("version"), bool):
        raise LoadError(f"{where}: unsupported version {d.get('version')!r} of the {what} format; "
                        f"this palette reads version {version}")
    return d


# -- strict field readers: a wrong type or range is a ValueError naming the field ------------------


def field_of(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{where}: missing {key!r}")
    return d[key]


def int_field(x: Any, what: str, minimum: int | None = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"{what}: expected an integer, got {_short(x)}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{what}: must be >= {minimum}, got {x}")
    return x


def float_field(x: Any, what: str, minimum: float | None = None, none: bool = False) -> float | None:
    if x is None and none:
        return None
    if not isinstance(x, (bool, int, float)):
        raise ValueError(f"{what}: expected a number, got {_short(x)}")
    f = number(x, what)
    if minimum is not None and f < minimum:
        raise ValueError(f"{what}: must be >= {minimum}, got {x!r}")
    return f


def str_field(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise ValueError(f"{what}: expected a string, got {_short(x)}")
    return x


def list_field(x: Any, what: str) -> list:
    if not isinstance(x, list):
        raise ValueError(f"{what}: expected a list, got {_short(x)}")
    return x


def dict_field(x: Any, what: str) -> dict:
    if not isinstance(x, dict):
        raise ValueError(f"{what}: expected an object, got {_short(x)}")
    return x


def _short(x: Any) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def plain(x: Any) -> Any:
    """`json.dumps(default=plain)`: numpy scalars and arrays as Python numbers and lists."""
    import numpy as np

    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")
