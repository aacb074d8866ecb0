"""Every file reader fuzzed: arbitrary bytes, and valid files mutated (bytes flipped, cut short,
JSON values replaced by hostile ones), may only raise ValueError (palette's `LoadError`) -- never a
TypeError, KeyError, RecursionError, OverflowError, UnicodeDecodeError or a library's own error."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from palette import PaletteSpec, Recipe, palettize
from palette.export import export_palettes, load_palettes
from palette.export.chunk import ChunkManifest
from palette.probe import Sensitivity, probe_sensitivity
from palette.recipe import Candidates, read_apple

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DIR = Path(tempfile.mkdtemp(prefix="palette-fuzz-"))


def _valid_files() -> dict[str, bytes]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    Recipe.from_specs(model, {"0": PaletteSpec(4), "1": PaletteSpec(2, "per_grouped_channel", 16)},
                      min_numel=0).save(DIR / "recipe.json")
    probe_sensitivity(model, (torch.randn(4, 32),), Candidates(min_numel=0, nbits=(2, 4), granularities=("per_tensor",)),
                      n_probes=2, progress=False).save(DIR / "sens.json")
    (DIR / "apple.json").write_text(json.dumps({"model_version": "m", "baselines": {"0": 30.5},
                                                "recipes": {"recipe_4_bit": {"0": 4, "1": 16}}}))
    manifest = {"format": "palette.chunks", "version": 1, "source": "m.mlpackage", "max_chunk_bytes": 100,
                "total_weight_bytes": 150, "shared": {},
                "inputs": [{"name": "x", "shape": [1, 4], "dtype": "FLOAT32"}],
                "outputs": [{"name": "y", "shape": [1, 4], "dtype": "FLOAT32"}],
                "chunks": [{"path": "m_chunk0.mlpackage", "weight_bytes": 90, "weight_file_bytes": 128, "n_ops": 3,
                            "first_op": "a", "last_op": "b",
                            "inputs": [{"name": "x", "shape": [1, 4], "dtype": "FLOAT32", "from_chunk": None}],
                            "outputs": [{"name": "y", "shape": [1, 4], "dtype": "FLOAT32", "to_chunks": [],
                                         "model_output": True}]}]}
    (DIR / "manifest.json").write_text(json.dumps(manifest))
    palettize(model, PaletteSpec(2, "per_grouped_channel", 16, per_channel_scale=True), min_numel=0, progress=False)
    export_palettes(model, DIR / "p.safetensors")
    return {name: (DIR / name).read_bytes() for name in
            ("recipe.json", "sens.json", "apple.json", "manifest.json", "p.safetensors")}


VALID = _valid_files()
READERS = {
    "recipe.json": Recipe.load,
    "sens.json": Sensitivity.load,
    "apple.json": read_apple,
    "manifest.json": ChunkManifest.load,
    "p.safetensors": load_palettes,
}


def _check(name: str, data: bytes) -> None:
    path = DIR / f"fuzzed-{name}"
    path.write_bytes(data)
    try:
        READERS[name](path)
    except ValueError:
        pass  # LoadError: a clear message naming the file


def test_valid_files_read() -> None:
    for name, reader in READERS.items():
        reader(DIR / name)


@pytest.mark.parametrize("name", list(READERS))
@SETTINGS
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(name: str, data: bytes) -> None:
    _check(name, data)


@pytest.mark.parametrize("name", list(READERS))
@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_valid_files_with_bytes_flipped_or_cut(name: str, edits, cut) -> None:
    data = bytearray(VALID[name])
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    _check(name, bytes(data))


HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just("NaN"), st.just(-1), st.just(1.5),
)


def _paths(x, prefix=()):
    yield prefix
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, (*prefix, i))


JSON_READERS = [n for n in READERS if n.endswith(".json")]


@pytest.mark.parametrize("name", JSON_READERS)
@SETTINGS
@given(choice=st.integers(0, 10**6), value=HOSTILE, raw=st.sampled_from(["", "NaN", "Infinity", "1e400", "-0"]))
def test_valid_json_with_a_value_replaced(name: str, choice: int, value, raw: str) -> None:
    doc = json.loads(VALID[name])
    paths = list(_paths(doc))[1:]
    path = paths[choice % len(paths)]
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = "__HOLE__" if raw else value
    text = json.dumps(doc).replace('"__HOLE__"', raw)
    _check(name, text.encode())
