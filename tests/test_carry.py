"""A palettized model carries its palettes: a user's own `ct.convert` emits them bit for bit, and
the model keeps working as a torch / diffusers model."""

from __future__ import annotations

import copy
import hashlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from palette import PaletteSpec, palettes_of, palettize, persistent_palettes, strip_palettes, target_layers
from palette.models.zoo import build

ct = pytest.importorskip("coremltools")

from palette.export import export_coreml  # noqa: E402
from palette.export.verify import load_program  # noqa: E402


class UserWrapper(nn.Module):
    """What a user writes to trace a diffusers UNet: tensors in, the noise prediction out."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, t, encoder_hidden_states=cond, return_dict=False)[0]


def example(unet: nn.Module) -> tuple[torch.Tensor, ...]:
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    return (torch.randn((1, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=gen),
            torch.tensor([500.0]), torch.randn((1, 7, cfg.cross_attention_dim), generator=gen))


def grouped_or_3bit(unet: nn.Module) -> dict[str, PaletteSpec]:
    return {n: PaletteSpec(4, "per_grouped_channel", 16) if m.weight.shape[0] % 16 == 0 else PaletteSpec(3)
            for n, m in target_layers(unet).items()}


def scaled(unet: nn.Module) -> dict[str, PaletteSpec]:
    nbits = (1, 2, 3, 4, 6, 8)
    return {n: PaletteSpec(nbits[i % 6], per_channel_scale=True) for i, n in enumerate(target_layers(unet))}


def vectors(unet: nn.Module) -> dict[str, PaletteSpec]:
    nbits = (2, 4, 6, 8)
    return {n: PaletteSpec(nbits[i % 4], "per_grouped_channel" if m.weight.shape[0] % 16 == 0 else "per_tensor",
                           16 if m.weight.shape[0] % 16 == 0 else None, cluster_dim=2)
            for i, (n, m) in enumerate(target_layers(unet).items())}


def user_convert(unet: nn.Module, path: str) -> None:
    """A plain conversion with no palette code: trace the user's wrapper, ct.convert, save."""
    inputs = example(unet)
    traced = torch.jit.trace(UserWrapper(unet).eval(), inputs, check_trace=False)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(shape=x.shape) for x in inputs],
                         minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram")
    mlmodel.save(path)


def lut_weights(path: str) -> list[np.ndarray]:
    """Every palettized weight of a saved program, decompressed by coremltools' own code: the
    constexpr ops' value inference, and its `lut_to_dense` where the LUT is itself scaled (the
    scale-first layout coremltools' passes make of a per-channel scale)."""
    from coremltools.optimize._utils import lut_to_dense

    prog, _, _ = load_program(path)
    out = []
    for op in prog.functions["main"].operations:
        if op.op_type != "constexpr_lut_to_dense":
            continue
        if op.lut.op.op_type == "constexpr_blockwise_shift_scale":  # scale-first
            vector_axis = None if op.vector_axis is None else int(op.vector_axis.val)
            dense = lut_to_dense(op.indices.val, op.lut.op.materialized_val_inference(), vector_axis)
        else:
            children = op.outputs[0].child_ops
            last = children[0] if len(children) == 1 and children[0].op_type.startswith("constexpr") else op
            dense = last.materialized_val_inference()
        out.append(np.asarray(dense).astype(np.float16))
    return out


def digest(a: np.ndarray) -> tuple[int, str]:
    a = np.ascontiguousarray(a, dtype=np.float16)
    return a.size, hashlib.sha256(a.tobytes()).hexdigest()


@pytest.mark.parametrize("plan", [grouped_or_3bit, scaled, vectors])
def test_users_own_conversion_emits_every_palette_bit_exact(plan, tmp_path):
    unet = build("sd15-unet", tiny=True)
    palettes = palettize(unet, plan(unet), progress=False)
    assert len(palettes) == len(target_layers(unet)) > 40
    path = str(tmp_path / "unet.mlpackage")
    user_convert(unet, path)
    stored = sorted(digest(w) for w in lut_weights(path))
    want = sorted(digest(p.dequantize().numpy()) for p in palettes.values())
    assert len(stored) == len(palettes)  # one constexpr_lut_to_dense per palettized layer
    assert stored == want  # each LUT[indices] (x scale) equals palette's dequantize() bit for bit

    if plan is not grouped_or_3bit:
        return
    # export_coreml without recipe= exports (and verifies) exactly the palettes the model carries
    report = export_coreml(unet, tmp_path / "export.mlpackage", example(unet))
    assert report.n_palettized == len(palettes)
    assert report.predicted_palettized_bytes == sum(p.nbytes for p in palettes.values())
    assert report.stored_palettized_bytes == sum(ios18_bytes(p) for p in palettes.values())


def ios18_bytes(p) -> int:
    """What iOS18 stores: palette's bytes, except that coremltools (below iOS26) keeps a scaled
    palette as one scaled LUT per output channel."""
    if p.scale is None:
        return p.nbytes
    out, (groups, k, d) = p.shape[0], p.lut.shape
    return p.nbytes + (out - groups) * k * d * 2


def test_palettes_read_back_and_strip():
    unet = build("sd15-unet", tiny=True)
    palettes = palettize(unet, grouped_or_3bit(unet), progress=False)
    carried = palettes_of(unet)
    assert list(carried) == list(palettes)
    for n, p in palettes.items():
        q = carried[n]
        assert torch.equal(q.lut, p.lut) and torch.equal(q.indices, p.indices) and q.spec == p.spec
    weights = {n: m.weight.detach().clone() for n, m in target_layers(unet).items()}
    assert strip_palettes(unet) == len(palettes)
    assert palettes_of(unet) == {}
    assert not any("_COREML_" in name for name, _ in unet.named_buffers())
    assert all(torch.equal(m.weight, weights[n]) for n, m in target_layers(unet).items())


def test_palettizing_twice_changes_nothing():
    unet = build("sd15-unet", tiny=True)
    plan = {**scaled(unet), **grouped_or_3bit(unet)}
    first = palettize(unet, plan, progress=False)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    again = palettize(unet, plan, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    for n in first:
        assert torch.equal(first[n].lut, again[n].lut) and torch.equal(first[n].indices, again[n].indices)


def test_a_weight_edited_after_palettizing_is_named():
    unet = build("sd15-unet", tiny=True)
    palettize(unet, PaletteSpec(4), progress=False)
    with torch.no_grad():
        unet.time_embedding.linear_1.weight[0, 0] += 0.001
    with pytest.raises(ValueError, match=r"time_embedding.linear_1: its weight is no longer the palette it carries \(1 of"):
        palettes_of(unet)


def test_lookalike_layers_without_palettes_warn(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    palettize(model, PaletteSpec(2), progress=False)
    strip_palettes(model)  # palettized values, no metadata: as another tool might leave it
    with pytest.warns(UserWarning, match=r"2 layer\(s\) hold at most 256 distinct values .* \(16,384 B\)"):
        report = export_coreml(model, tmp_path / "m.mlpackage", (torch.randn(1, 64),))
    assert report.n_palettized == 0


def test_state_dict_deepcopy_compile_and_devices():
    unet = build("sd15-unet", tiny=True)
    palettes = palettize(unet, grouped_or_3bit(unet), progress=False)
    sd = unet.state_dict()
    assert not any("_COREML_" in k for k in sd)  # the state_dict is a dense model's
    fresh = build("sd15-unet", tiny=True, seed=1)
    fresh.load_state_dict(sd)  # strict: loads into a plain model of the same architecture
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))
    unet.load_state_dict(sd)  # and back into the palettized one
    assert list(palettes_of(unet)) == list(palettes)

    twin = copy.deepcopy(unet)
    assert list(palettes_of(twin)) == list(palettes)
    moved = twin.to("cpu", torch.float64).to(torch.float32)
    assert list(palettes_of(moved)) == list(palettes)

    inputs = example(unet)
    with torch.no_grad():
        ref = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
        compiled = torch.compile(unet, backend="aot_eager")
        got = compiled(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    assert torch.equal(ref, got)


def test_save_pretrained_round_trip_with_plain_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = build("sd15-unet", tiny=True)
    palettize(unet, grouped_or_3bit(unet), progress=False)
    unet.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "weights not used" or other warnings
        loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_torch_export_conversion_with_persistent_palettes() -> None:
    """An ExportedProgram keeps persistent buffers only: inside persistent_palettes() coremltools sees
    the metadata of a torch.export conversion too; outside, the state_dict is a dense model's."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    palettes = palettize(model, PaletteSpec(3), progress=False)
    x = (torch.randn(1, 64),)
    with persistent_palettes(model):
        program = torch.export.export(model, x).run_decompositions({})
    assert not any("_COREML_" in k for k in model.state_dict())
    mlmodel = ct.convert(program, minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram")
    luts = [op for op in mlmodel._mil_program.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == len(palettes) == 2
    stored = sorted(digest(op.materialized_val_inference()) for op in luts)
    assert stored == sorted(digest(p.dequantize().numpy()) for p in palettes.values())
