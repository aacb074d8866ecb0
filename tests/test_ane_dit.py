"""Split-einsum attention for diffusion transformers (SD3, FLUX, PixArt, SANA; issue 20).

Tiny random models of each class (`palette.models.zoo`): the rewrite (v1 and v2) is exact to
>= 60 dB in fp32, restores bit for bit, refuses unsupported processors and features by name
without leaving anything rewritten, converts to rank-4 Core ML attention, and exports palettized.
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    PAGCFGSanaLinearAttnProcessor2_0,
    PAGJointAttnProcessor2_0,
    SlicedAttnProcessor,
)
from diffusers.models.normalization import LpNorm
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
from torch import nn

from palette import PaletteSpec, export_coreml, target_layers
from palette.ane import is_split_einsum, psnr, restore_attention, split_einsum, validate_split_einsum
from palette.ane.conv import Conv1x1
from palette.ane.diffusers_attention import SplitEinsumProcessor
from palette.ane.dit_attention import (
    SplitEinsumFluxProcessor,
    SplitEinsumJointProcessor,
    SplitEinsumLinearProcessor,
)
from palette.models.zoo import config
from palette.palettize import palettize

from dits import tiny

MIN_PSNR = 60.0
CLASSES = ("sd3", "flux", "pixart", "sana")
TOKENS = 7  # text tokens; the second prompt of a batch of 2 is padded after 4


def inputs(name: str, batch: int = 2, masked: bool = True) -> dict[str, object]:
    """Keyword inputs of the tiny `name` transformer (FLUX: a 4x4 latent of packed tokens)."""
    g = torch.Generator().manual_seed(1)
    _, cfg = config(name, tiny=True)
    timestep = torch.tensor([999.0, 10.0][:batch])
    if name == "flux":
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
        return {
            "hidden_states": torch.randn(batch, 16, cfg["in_channels"], generator=g),
            "encoder_hidden_states": torch.randn(batch, TOKENS, cfg["joint_attention_dim"], generator=g),
            "pooled_projections": torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
            "timestep": timestep / 1000,
            "img_ids": img_ids.reshape(-1, 3),
            "txt_ids": torch.zeros(TOKENS, 3),
            "guidance": torch.full((batch,), 3.5),
        }
    size = cfg["sample_size"]
    latent = torch.randn(batch, cfg["in_channels"], size, size, generator=g)
    if name == "sd3":
        return {
            "hidden_states": latent,
            "encoder_hidden_states": torch.randn(batch, TOKENS, cfg["joint_attention_dim"], generator=g),
            "pooled_projections": torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
            "timestep": timestep,
        }
    kwargs = {
        "hidden_states": latent,
        "encoder_hidden_states": torch.randn(batch, TOKENS, cfg["caption_channels"], generator=g),
        "timestep": timestep,
    }
    if masked:
        mask = torch.ones(batch, TOKENS)
        mask[1:, 4:] = 0
        kwargs["encoder_attention_mask"] = mask
    return kwargs


def run(model: nn.Module, kwargs: dict[str, object]) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


def attention_outputs(model: nn.Module, kwargs: dict[str, object]) -> dict[str, torch.Tensor]:
    """Each attention module's output (joint ones: sample and context joined), by name."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: object, out: torch.Tensor | tuple) -> None:
            outputs[name] = torch.cat(out, dim=1) if isinstance(out, tuple) else out

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if hasattr(m, "processor")]
    try:
        run(model, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type], dict[str, object]]:
    """Weights (copied), module types and attention processors (the objects) by name."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    return state, types, processors


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def assert_restored(model: nn.Module, before: tuple) -> None:
    state, types, processors = before
    assert_same_state(model, state)
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert now.keys() == processors.keys() and all(now[n] is p for n, p in processors.items())
    assert not is_split_einsum(model)


# name -> (number of attention modules, {module: split-einsum processor type}, joint projections)
EXPECTED = {
    "sd3": (2, {"transformer_blocks.0.attn": SplitEinsumJointProcessor,
                "transformer_blocks.1.attn": SplitEinsumJointProcessor},
            ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
             "transformer_blocks.1.attn.add_v_proj"]),
    "flux": (3, {"transformer_blocks.0.attn": SplitEinsumFluxProcessor,
                 "single_transformer_blocks.1.attn": SplitEinsumFluxProcessor},
             ["transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out",
              "single_transformer_blocks.0.attn.to_q"]),
    "pixart": (4, {"transformer_blocks.0.attn1": SplitEinsumProcessor,
                   "transformer_blocks.1.attn2": SplitEinsumProcessor},
               ["transformer_blocks.0.attn2.to_k", "transformer_blocks.1.attn1.to_out.0"]),
    "sana": (4, {"transformer_blocks.0.attn1": SplitEinsumLinearProcessor,
                 "transformer_blocks.0.attn2": SplitEinsumProcessor},
             ["transformer_blocks.1.attn1.to_v", "transformer_blocks.1.attn2.to_out.0"]),
}


@pytest.mark.parametrize("variant,chunk_size", [("v1", 512), ("v2", 5)])
@pytest.mark.parametrize("name", CLASSES)
def test_rewrite_is_exact_and_restores_bit_for_bit(name, variant, chunk_size):
    model = tiny(name)
    kwargs = inputs(name)
    ref = run(model, kwargs)
    before = snapshot(model)
    count, processors, projections = EXPECTED[name]

    st = split_einsum(model, variant=variant, chunk_size=chunk_size)
    try:
        assert st.count == count
        for module, cls in processors.items():
            processor = model.get_submodule(module).processor
            assert type(processor) is cls
            if cls is not SplitEinsumLinearProcessor:
                assert processor.chunk_size == (chunk_size if variant == "v2" else None)
        for projection in projections:
            assert isinstance(model.get_submodule(projection), Conv1x1)
        assert {n for n, _ in model.named_modules()} == set(before[1])  # every layer name resolves
        out = run(model, kwargs)
    finally:
        restore_attention(model)

    assert psnr(out, ref) >= MIN_PSNR
    assert (out - ref).abs().max() < 1e-4
    assert_restored(model, before)


@pytest.mark.parametrize(
    "name,overrides,n_norms",
    [
        ("sd3", {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}, 10),  # SD3.5: RMS qk norms, attn2
        ("sd3", {"qk_norm": "layer_norm"}, 8),
        ("sana", {"qk_norm": "rms_norm_across_heads"}, 8),  # SANA 1.5: norms over all heads
    ],
)
def test_qk_norms_and_dual_attention(name, overrides, n_norms):
    model = tiny(name, **overrides)
    kwargs = inputs(name)
    ref, refs = run(model, kwargs), attention_outputs(model, kwargs)
    norms = [m for n, m in model.named_modules() if re.search(r"\.norm_(added_)?[qk]$", n)]
    assert len(norms) == n_norms
    with torch.no_grad():  # the norm weights matter: reversed, every attention output changes
        weights = [norm.weight.clone() for norm in norms]
        for norm, weight in zip(norms, weights):
            norm.weight.copy_(weight.flip(0))
        changed = attention_outputs(model, kwargs)
        for norm, weight in zip(norms, weights):
            norm.weight.copy_(weight)
    assert all(psnr(changed[n], r) < 40 for n, r in refs.items())
    before = snapshot(model)
    for variant in ("v1", "v2"):
        split_einsum(model, variant=variant, chunk_size=6)
        try:
            out, outs = run(model, kwargs), attention_outputs(model, kwargs)
        finally:
            restore_attention(model)
        assert psnr(out, ref) >= MIN_PSNR, variant
        assert outs.keys() == refs.keys() and all(psnr(outs[n], r) >= MIN_PSNR for n, r in refs.items())
    assert_restored(model, before)


def test_flux_rotary_and_masks_are_honoured():
    model = tiny("flux")
    kwargs = inputs("flux")
    mask = torch.ones(2, TOKENS + 16, dtype=torch.bool)
    mask[1, 3:TOKENS] = False  # the second prompt hides 4 of its text tokens
    masked = {**kwargs, "joint_attention_kwargs": {"attention_mask": mask}}
    shifted = {**kwargs, "img_ids": kwargs["img_ids"] + 1.0}  # other rotary positions
    refs = [run(model, k) for k in (kwargs, masked, shifted)]
    assert psnr(refs[1][1:], refs[0][1:]) < 40  # the mask matters
    assert psnr(refs[2], refs[0]) < 40  # the rotary embedding matters
    for variant in ("v1", "v2"):
        split_einsum(model, variant=variant, chunk_size=6)
        try:
            outs = [run(model, k) for k in (kwargs, masked, shifted)]
        finally:
            restore_attention(model)
        for out, ref in zip(outs, refs):
            assert psnr(out, ref) >= MIN_PSNR, variant
        assert psnr(outs[1][1:], refs[1][1:]) >= MIN_PSNR


def test_masks_matter_for_pixart_and_sana_cross_attention():
    for name in ("pixart", "sana"):
        model = tiny(name)
        ref, unmasked = run(model, inputs(name)), run(model, inputs(name, masked=False))
        assert psnr(unmasked[1:], ref[1:]) < 40, name  # padding the second prompt changes it
        split_einsum(model, variant="v2", chunk_size=5)
        try:
            out = run(model, inputs(name))
        finally:
            restore_attention(model)
        assert psnr(out[1:], ref[1:]) >= MIN_PSNR, name


def test_pixart_with_the_classic_attn_processor():
    model = tiny("pixart")
    model.set_default_attn_processor()  # AttnProcessor: baddbmm attention, masks prepared per head
    ref = run(model, inputs("pixart"))
    before = snapshot(model)
    split_einsum(model, variant="v2", chunk_size=5)
    try:
        assert type(model.transformer_blocks[0].attn2.processor) is SplitEinsumProcessor
        out = run(model, inputs("pixart"))
    finally:
        restore_attention(model)
    assert psnr(out, ref) >= MIN_PSNR
    assert_restored(model, before)

    # AttnProcessor ignores qk norms, which SplitEinsumProcessor would apply: refused, not changed
    attn = Attention(query_dim=32, heads=2, dim_head=16, qk_norm="rms_norm", processor=AttnProcessor())
    with pytest.raises(NotImplementedError, match=r"norm_q \(which AttnProcessor ignores\)"):
        split_einsum(attn)
    assert type(attn.processor) is AttnProcessor and type(attn.to_q) is nn.Linear


@pytest.mark.parametrize(
    "name,module,processor",
    [
        ("sd3", "transformer_blocks.1.attn", PAGJointAttnProcessor2_0),
        ("flux", "single_transformer_blocks.1.attn", lambda: FluxIPAdapterAttnProcessor(64, 64)),
        ("pixart", "transformer_blocks.1.attn2", lambda: SlicedAttnProcessor(slice_size=1)),
        ("sana", "transformer_blocks.1.attn1", PAGCFGSanaLinearAttnProcessor2_0),
    ],
)
def test_unsupported_processor_is_named_and_nothing_is_left_rewritten(name, module, processor):
    model = tiny(name)
    model.get_submodule(module).set_processor(processor())
    before = snapshot(model)
    # the last attention fails, after the others were rewritten: they must all be put back
    with pytest.raises(NotImplementedError) as error:
        split_einsum(model, variant="v2", chunk_size=4)
    message = str(error.value)
    assert module in message and type(before[2][module]).__name__ in message
    assert "no split-einsum form" in message
    assert not any(isinstance(m, Conv1x1) for m in model.modules())
    assert_restored(model, before)


def test_unsupported_features_are_named():
    model = tiny("flux")
    model.transformer_blocks[0].attn.fuse_projections()
    with pytest.raises(NotImplementedError, match=r"transformer_blocks\.0\.attn .*fused projections"):
        split_einsum(model)
    assert not is_split_einsum(model)

    model = tiny("sd3", qk_norm="rms_norm")
    model.transformer_blocks[1].attn.norm_k = LpNorm()
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match=r"transformer_blocks\.1\.attn .*norm_k \(qk norm LpNorm\)"):
        split_einsum(model)
    assert_restored(model, before)


def test_palettized_while_rewritten_equals_palettized_plain():
    spec = PaletteSpec(nbits=4, granularity="per_grouped_channel", group_size=4)
    plain, rewritten = tiny("flux"), tiny("flux")
    split_einsum(rewritten, variant="v2", chunk_size=8)
    assert list(target_layers(rewritten)) == list(target_layers(plain))  # recipe names resolve
    pal_plain = palettize(plain, spec, progress=False)
    pal_rewritten = palettize(rewritten, spec, progress=False)
    assert "transformer_blocks.0.attn.add_q_proj" in pal_rewritten
    for name, a in pal_plain.items():
        b = pal_rewritten[name]
        assert torch.equal(a.lut, b.lut) and torch.equal(a.indices.reshape(b.indices.shape), b.indices), name
    restore_attention(rewritten)
    assert {n: type(m) for n, m in rewritten.named_modules()} == {n: type(m) for n, m in plain.named_modules()}
    assert_same_state(rewritten, plain.state_dict())


# ---------------------------------------------------------------------------------------------
# Core ML: converted structure and palettized export


def test_validate_flux_keyword_inputs_with_coreml_structure():
    model = tiny("flux")
    before = snapshot(model)
    report = validate_split_einsum(model, inputs("flux", batch=1), variant="v1")
    print(report)
    assert report.passed and report.psnr >= MIN_PSNR
    o, r = report.original_ops, report.rewrite_ops
    assert o.attention["scaled_dot_product_attention"] == 3 and not r.non_rank4
    assert r.attention["einsum"] == 3 * 2 * 2 and r.attention["softmax"] == 3 * 2  # modules x heads
    assert r.attention["reshape"] == 0 and r.layout_ops < o.layout_ops
    assert r.attention["conv"] == 8 + 2 * 3 and r.attention["linear"] == 0  # joint: 8, single: 3
    assert_restored(model, before)


def test_validate_sana_linear_attention_args_kwargs_with_coreml_structure():
    model = tiny("sana")
    kwargs = inputs("sana", batch=1)
    args = tuple(kwargs.pop(k) for k in ("hidden_states", "encoder_hidden_states", "timestep"))
    before = snapshot(model)
    report = validate_split_einsum(model, (args, kwargs), variant="v2", chunk_size=40)
    print(report)
    assert report.passed and report.psnr >= MIN_PSNR
    o, r = report.original_ops, report.rewrite_ops
    assert o.attention["matmul"] == 4 and r.attention["matmul"] == 0  # linear attention's two matmuls
    # per layer and head: 3 einsums of linear attention (never chunked), 2 of cross-attention for
    # each of 2 query chunks (64 latent tokens in chunks of 40)
    assert r.attention["einsum"] == 2 * 2 * (3 + 2 * 2) and not r.non_rank4
    assert r.attention["reshape"] == 0 and r.layout_ops < o.layout_ops
    assert r.attention["conv"] == 16 and r.attention["linear"] == 0
    assert_restored(model, before)


@pytest.mark.parametrize("name,variant", [("sd3", "v1"), ("flux", "v2"), ("pixart", "v2"), ("sana", "v1")])
def test_palettized_split_einsum_export_is_bit_exact(tmp_path, name, variant):
    model = tiny(name)
    split_einsum(model, variant=variant, chunk_size=8)
    try:
        spec = PaletteSpec(4, "per_grouped_channel", 16)
        mapping = {n: spec for n, m in target_layers(model).items() if m.weight.shape[0] % 16 == 0}
        palettes = palettize(model, mapping, progress=False)
        projections = [n for n in palettes if ".attn" in n]
        assert projections and all(model.get_submodule(n).weight.dim() == 4 for n in projections)
        example = {**inputs(name, batch=1), "return_dict": False}  # a non-tensor keyword input
        report = export_coreml(model, tmp_path / f"{name}.mlpackage", example)  # the palettes it carries
        assert report.n_palettized == len(palettes) and report.n_kept == 0
        assert report.stored_palettized_bytes == sum(p.nbytes for p in palettes.values())
    finally:
        restore_attention(model)
    for n, pal in palettes.items():  # palettes carried back to the Linear layers unchanged
        weight = model.get_submodule(n).weight
        assert torch.equal(weight.reshape(pal.shape), pal.dequantize().float()), n
