"""Shared test set-up: the repository root on sys.path (for benchmarks.coreml_reference)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
