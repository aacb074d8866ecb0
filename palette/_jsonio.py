"""JSON files that are written whole or not at all, and read with a clear error when damaged."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary sibling, then rename it over `path`: no half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """Parse `path`; a file that is not valid JSON raises ValueError naming it as a corrupt `what`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt {what} file (not valid JSON: {e}){hint}") from None
