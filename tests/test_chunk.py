"""palette.export.chunk: splitting a palettized Core ML program into chunks under a size limit.

The default model's UNet is converted once (the slow part, ~1 min on 2 shared cores) with a limit
that forces 2 chunks; the other splits reuse that saved program.
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch

logging.getLogger("coremltools").setLevel(logging.ERROR)

from palette import PaletteSpec, target_layers  # noqa: E402
from palette.export import (  # noqa: E402
    ChunkedExportReport,
    ChunkManifest,
    VerificationError,
    chunk_mlpackage,
    chunks_needed,
    export_coreml,
    layer_bytes_in_order,
    verify_chunks,
)
from palette.export.chunk import MANIFEST, chunks_folder  # noqa: E402


@pytest.fixture(scope="module")
def default_unet():
    """The default model's UNet with its trained weights, a 4-bit
    recipe (per_grouped_channel where 16 divides the output channels), and example inputs."""
    from palette.models import default

    unet = default.load_unet()
    recipe = {
        n: PaletteSpec(4, "per_grouped_channel", 16) if m.weight.shape[0] % 16 == 0 else PaletteSpec(4)
        for n, m in target_layers(unet).items()
    }
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen),
        torch.tensor([500.0]),
        torch.randn(1, 16, cfg.cross_attention_dim, generator=gen),
    )
    return unet, recipe, inputs


@pytest.fixture(scope="module")
def two_chunks(default_unet, tmp_path_factory):
    """Exported once with a limit of the estimated weight bytes / 1.6: two chunks."""
    unet, recipe, inputs = default_unet
    estimate = sum(b for _, b in layer_bytes_in_order(unet, recipe, inputs))
    limit = int(estimate / 1.6)
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    path = tmp_path_factory.mktemp("default") / "Unet.mlpackage"
    report = export_coreml(unet, path, inputs, recipe, max_chunk_bytes=limit)
    after = unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    return report, limit


def _check_chain(m: ChunkManifest) -> None:
    """Every chunk input comes from a model input or an earlier chunk's output of the same
    name, shape and dtype; the last model output comes from a chunk."""
    model_inputs = {t.name: t for t in m.inputs}
    for k, c in enumerate(m.chunks):
        for t in c.inputs:
            if t.from_chunk is None:
                assert (t.name, t.shape, t.dtype) == tuple(vars(model_inputs[t.name]).values())
            else:
                assert t.from_chunk < k
                out = next(o for o in m.chunks[t.from_chunk].outputs if o.name == t.name)
                assert (out.shape, out.dtype) == (t.shape, t.dtype) and k in out.to_chunks
    assert [o.name for o in m.chunks[-1].outputs if o.model_output] == [t.name for t in m.outputs]


def test_export_splits_into_two_chunks(default_unet, two_chunks):
    report, limit = two_chunks
    unet, recipe, inputs = default_unet
    assert isinstance(report, ChunkedExportReport)
    assert report.stored_palettized_bytes == report.predicted_palettized_bytes
    m = report.chunks
    assert len(m.chunks) == 2
    assert all(c.weight_bytes <= limit for c in m.chunks)
    assert m.total_weight_bytes > limit
    # Each constant is in one chunk, except those the whole program shares across the cut.
    duplicated = sum(s["bytes"] * (len(s["chunks"]) - 1) for s in m.shared.values())
    assert sum(c.weight_bytes for c in m.chunks) == m.total_weight_bytes + duplicated
    assert [p.name for p in m.chunk_paths()] == ["Unet_chunk1.mlpackage", "Unet_chunk2.mlpackage"]
    assert m.folder == str(chunks_folder(report.path))
    _check_chain(m)
    assert ChunkManifest.load(m.folder).to_dict() == m.to_dict()
    saved = json.loads((chunks_folder(report.path) / MANIFEST).read_text())
    assert saved["chunks"][1]["inputs"][0]["from_chunk"] == 0
    # The forward-order estimate agrees with the program's split.
    assert chunks_needed(layer_bytes_in_order(unet, recipe, inputs), limit) == 2


def test_three_chunks_from_the_saved_program(default_unet, two_chunks, tmp_path):
    report, _ = two_chunks
    unet, recipe, inputs = default_unet
    limit = int(report.chunks.total_weight_bytes / 2.6)
    m = chunk_mlpackage(report.path, tmp_path, limit)
    assert len(m.chunks) == 3
    assert all(c.weight_bytes <= limit for c in m.chunks)
    sizes = [c.weight_bytes for c in m.chunks]
    assert max(sizes) < 1.3 * report.chunks.total_weight_bytes / 3  # balanced, not greedy-filled
    _check_chain(m)
    # Skip connections go straight from chunk 1 to chunk 3.
    assert any(t.from_chunk == 0 for t in m.chunks[2].inputs)
    assert chunks_needed(layer_bytes_in_order(unet, recipe, inputs), limit) == 3


def test_a_program_under_the_limit_is_one_chunk(two_chunks, tmp_path):
    report, _ = two_chunks
    m = chunk_mlpackage(report.path, tmp_path, report.chunks.total_weight_bytes)
    assert len(m.chunks) == 1 and m.chunks[0].weight_bytes == m.total_weight_bytes
    assert all(t.from_chunk is None for t in m.chunks[0].inputs)
    assert all(t.model_output for t in m.chunks[0].outputs)


def test_limit_below_the_largest_weight_names_it(default_unet, two_chunks, tmp_path):
    report, _ = two_chunks
    unet, recipe, inputs = default_unet
    name, largest = max(layer_bytes_in_order(unet, recipe), key=lambda nb: nb[1])
    with pytest.raises(ValueError, match=name.replace(".", "_") + " alone stores"):
        chunk_mlpackage(report.path, tmp_path, largest - 1)
    with pytest.raises(ValueError, match=rf"{re.escape(name)} alone stores {largest:,} B"):  # before converting
        export_coreml(unet, tmp_path / "x.mlpackage", inputs, recipe, max_chunk_bytes=largest - 1)
    with pytest.raises(ValueError, match=f"{name} alone"):
        chunks_needed(layer_bytes_in_order(unet, recipe), largest - 1)
    with pytest.raises(ValueError, match="positive int"):
        chunk_mlpackage(report.path, tmp_path, 0)


def test_verification_catches_a_broken_chain_or_size(two_chunks, tmp_path):
    report, _ = two_chunks
    folder = tmp_path / "chunks"
    shutil.copytree(report.chunks.folder, folder)
    m = ChunkManifest.load(folder)
    m.source = str(report.path)
    verify_chunks(m)
    m.chunks[1].weight_bytes -= 1
    with pytest.raises(VerificationError, match="manifest says"):
        verify_chunks(m)
    m = ChunkManifest.load(folder)
    m.source = str(report.path)
    m.max_chunk_bytes = min(c.weight_bytes for c in m.chunks) - 1
    with pytest.raises(VerificationError, match="over the limit"):
        verify_chunks(m)
    m = ChunkManifest.load(folder)
    m.source = str(report.path)
    shutil.rmtree(folder / m.chunks[1].path)
    shutil.copytree(folder / m.chunks[0].path, folder / m.chunks[1].path)  # chunk 1 twice
    with pytest.raises(VerificationError, match=r"op\(s\) are not in exactly one chunk(.|\n)*more chunks than ops read"):
        verify_chunks(m)


def test_chunks_needed_is_greedy_and_exact():
    layers = [("a", 4), ("b", 3), ("c", 3), ("d", 5), ("e", 1)]
    assert chunks_needed(layers, 16) == 1
    assert chunks_needed(layers, 10) == 2  # a b c | d e
    assert chunks_needed(layers, 7) == 3  # a b | c | d e
    assert chunks_needed(layers, 5) == 5
    assert chunks_needed([], 1) == 1
    with pytest.raises(ValueError, match="weight d alone"):
        chunks_needed(layers, 4)
