"""Sensitivity probing: estimators agree, the model is left bit-identical whatever happens,
results are deterministic, JSON round trips, caches resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from palette.cluster import fit_palette
from palette.metrics import cosine, mse, psnr, spearman
from palette.probe import Sensitivity, make_probe_set, probe_sensitivity
from palette.recipe import Candidates
from palette.spec import PaletteSpec

FAST = dict(progress=False, n_probes=4, candidates=Candidates(nbits=(2, 4), granularities=("per_tensor",)))


def synth(model: nn.Module, n: int = 2, seed: int = 0, batch_size: int | None = None):
    """Data-free probe inputs of `n` samples."""
    return make_probe_set(model, seed=seed, n_samples=n, batch_size=batch_size)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far slower with two on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(fp16_weights: bool = False) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    unet.requires_grad_(True)  # as a training model would be: flags must survive probing
    if fp16_weights:
        with torch.no_grad():
            for p in unet.parameters():
                p.copy_(p.half().float())
    return unet


def tiny_bert() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    with torch.no_grad():  # spread the layers' sensitivities like a trained model's
        for i, (_, m) in enumerate(sorted((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear))):
            m.weight.mul_(0.5 + 0.25 * (i % 5))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (6, 12), generator=g)
    return model, (ids, torch.ones_like(ids))


def snapshot(model: nn.Module) -> dict:
    params = dict(model.named_parameters())
    return {
        "weights": {n: p.detach().clone() for n, p in params.items()},
        "flags": {n: p.requires_grad for n, p in params.items()},
        "grads": {n: p.grad for n, p in params.items()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    params = dict(model.named_parameters())
    for n, p in params.items():
        assert torch.equal(p.detach(), snap["weights"][n]), n  # bit-identical (same dtype, values)
        assert p.requires_grad == snap["flags"][n], n
        assert p.grad is snap["grads"][n], n
    assert {n: m.training for n, m in model.named_modules()} == snap["training"]


def test_metrics_psnr_by_hand() -> None:
    ref = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.1, 0.2, -0.3, 0.4]])
    x = ref + torch.tensor([[0.1, 0.0, -0.1, 0.0], [0.0, 0.01, 0.0, -0.01]])
    by_hand = []
    for r, y in zip(ref.tolist(), x.tolist()):
        rmse = math.sqrt(sum((a - b) ** 2 for a, b in zip(y, r)) / len(r))
        by_hand.append(20 * math.log10((max(abs(v) for v in r) + 1e-5) / (rmse + 1e-10)))
    assert psnr(x, ref) == pytest.approx(sum(by_hand) / 2, rel=1e-12)
    assert mse(x, ref) == pytest.approx(float(((x - ref) ** 2).mean()), rel=1e-6)
    assert cosine(ref, ref) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("method", ["fast", "exhaustive"])
def test_weights_flags_grads_unchanged_after_probe(method: str) -> None:
    unet = tiny_unet()
    for p in list(unet.parameters())[:3]:
        p.grad = torch.ones_like(p)
    unet.train()
    snap = snapshot(unet)
    sens = probe_sensitivity(unet, synth(unet), method=method, **FAST)
    assert_unchanged(unet, snap)
    assert len(sens.layers) > 10 and "synthesised" in sens.inputs_description


class Boom(Exception):
    pass


def raise_on_call(model: nn.Module, layer: str, n: int, exc: type[BaseException]):
    module = dict(model.named_modules())[layer]
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] >= n:
            raise exc("injected")

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("method", ["fast", "exhaustive"])
def test_unchanged_when_interrupted_midway(method: str, exc: type[BaseException]) -> None:
    unet = tiny_unet()
    unet.conv_in.weight.grad = torch.zeros_like(unet.conv_in.weight)
    snap = snapshot(unet)
    # exhaustive: raise while some layer is palettized (3rd forward); fast: in the 2nd unit
    handle = raise_on_call(unet, "conv_out", 3 if method == "exhaustive" else 2, exc)
    with pytest.raises(exc):
        probe_sensitivity(unet, synth(unet, batch_size=1), method=method, **FAST)
    handle.remove()
    assert_unchanged(unet, snap)


def test_unchanged_when_callable_input_raises() -> None:
    model, (ids, mask) = tiny_bert()
    snap = snapshot(model)
    calls = {"n": 0}

    def run(m):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Boom("input failed")
        return m(ids, mask).last_hidden_state

    with pytest.raises(Boom):
        probe_sensitivity(model, run, method="exhaustive", **FAST)
    assert_unchanged(model, snap)


def test_same_seed_same_bytes_and_json_round_trip(tmp_path) -> None:
    unet = tiny_unet()
    a = probe_sensitivity(unet, synth(unet, seed=3), seed=3, **FAST)
    b = probe_sensitivity(unet, synth(unet, seed=3), seed=3, **FAST)
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    c = Sensitivity.load(tmp_path / "a.json")
    c.save(tmp_path / "c.json")
    assert (tmp_path / "c.json").read_bytes() == (tmp_path / "a.json").read_bytes()
    spec = PaletteSpec(nbits=4)
    mapping = a.uniform(spec)
    assert c.predict_psnr(mapping) == a.predict_psnr(mapping)
    first = next(iter(a.layers))
    assert c.error(first, spec) == a.error(first, spec)
    other = probe_sensitivity(unet, synth(unet, seed=4), seed=4, **FAST)
    assert other.predict_psnr(mapping) != a.predict_psnr(mapping)


def test_corrupt_files_give_clear_errors(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        Sensitivity.load(bad)
    bad.write_text('{"format": "palette.sensitivity", "version": 1}')
    with pytest.raises(ValueError, match="invalid sensitivity"):
        Sensitivity.load(bad)


def test_cache_resumes_to_the_same_result(tmp_path) -> None:
    model, inputs = tiny_bert()
    full = probe_sensitivity(model, inputs, method="exhaustive", **FAST)
    handle = raise_on_call(model, "encoder.layer.1.output.dense", 6, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        probe_sensitivity(model, inputs, method="exhaustive", cache=tmp_path / "c", **FAST)
    handle.remove()
    resumed = probe_sensitivity(model, inputs, method="exhaustive", cache=tmp_path / "c", **FAST)
    assert resumed.to_dict() == full.to_dict()
    import palette.probe.fast as probe_fast
    import palette.probe.sketch as probe_sketch

    def interrupt_at(obj, attr: str, n: int):
        """Make obj.attr raise KeyboardInterrupt on its n-th call; returns the undo."""
        real = getattr(obj, attr)
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        setattr(obj, attr, flaky)
        return lambda: setattr(obj, attr, real)

    # fast, streamed: interrupted in the passes (after fitting), then resumed without refitting
    fast_full = probe_sensitivity(model, inputs, **FAST)
    undo = interrupt_at(probe_sketch.Streamed, "__call__", 7)
    try:
        with pytest.raises(KeyboardInterrupt):
            probe_sensitivity(model, inputs, cache=tmp_path / "f", **FAST)
    finally:
        undo()
    undo = interrupt_at(probe_fast, "_fit", 1)  # a refit would raise
    try:
        resumed = probe_sensitivity(model, inputs, cache=tmp_path / "f", **FAST)
    finally:
        undo()
    assert resumed.to_dict() == fast_full.to_dict()
    # fast, sketched: interrupted while scoring (after the passes), then resumed
    sketched_full = probe_sensitivity(model, inputs, keep_sketch=True, **FAST)
    undo = interrupt_at(probe_sketch.Scorer, "__call__", 7)
    try:
        with pytest.raises(KeyboardInterrupt):
            probe_sensitivity(model, inputs, cache=tmp_path / "s", keep_sketch=True, **FAST)
    finally:
        undo()
    resumed = probe_sensitivity(model, inputs, cache=tmp_path / "s", keep_sketch=True, **FAST)
    assert resumed.to_dict() == sketched_full.to_dict()
    with pytest.raises(ValueError, match="another model"):
        probe_sensitivity(model, inputs, cache=tmp_path / "f", **{**FAST, "n_probes": 5})


def test_fast_ranks_layers_like_exhaustive() -> None:
    model, inputs = tiny_bert()
    kw = dict(progress=False, candidates=Candidates(nbits=(4,), granularities=("per_tensor",)))
    fast = probe_sensitivity(model, inputs, n_probes=16, **kw)
    exh = probe_sensitivity(model, inputs, method="exhaustive", **kw)
    spec = PaletteSpec(nbits=4)
    names = list(exh.layers)
    rho = spearman([fast.error(n, spec) for n in names], [exh.error(n, spec) for n in names])
    assert rho >= 0.9, rho
    assert fast.error("pooler.dense", spec) == 0.0 == exh.error("pooler.dense", spec)
    assert abs(fast.predict_psnr(fast.uniform(spec)) - exh.predict_psnr(exh.uniform(spec))) < 1.5
    assert fast.cost.forward_equivalents == 1 + 2 * 16
    assert exh.cost.forward_equivalents == 1 + len(names)


def test_estimate_scores_importance_weighted_palettes_from_the_sketch() -> None:
    model, inputs = tiny_bert()
    spec = PaletteSpec(nbits=3)
    sens = probe_sensitivity(model, inputs, Candidates(nbits=(3,), granularities=("per_tensor",)), n_probes=4,
                             progress=False, importance=True, keep_sketch=True)
    name = "encoder.layer.0.attention.self.query"
    w = dict(model.named_modules())[name].weight
    assert sens.importance[name].shape == w.shape and bool((sens.importance[name] >= 0).all())
    plain = fit_palette(w, spec, name=name)
    assert sens.estimate(name, plain) == pytest.approx(sens.error(name, spec), rel=1e-9)
    weighted = fit_palette(w, spec, sens.importance[name], name=name)
    assert sens.estimate(name, weighted) > 0
    assert sens.estimate(name, weighted.dequantize()) == pytest.approx(sens.estimate(name, weighted), rel=1e-9)
    with pytest.raises(ValueError, match="function"):
        sens.estimate(name, w + torch.randn_like(w) * 1e-3)


def test_per_grouped_channel_specs_use_dense_sketches() -> None:
    model, inputs = tiny_bert()
    specs = [PaletteSpec(nbits=4), PaletteSpec(nbits=4, granularity="per_grouped_channel", group_size=16)]
    sens = probe_sensitivity(model, inputs, specs, n_probes=4, progress=False, keep_sketch=True)
    name = "encoder.layer.0.output.dense"
    assert sens.error(name, specs[1]) < sens.error(name, specs[0])  # finer LUTs, smaller error
    w = dict(model.named_modules())[name].weight
    assert sens.estimate(name, fit_palette(w, specs[1])) == pytest.approx(sens.error(name, specs[1]), rel=1e-6)


def test_streamed_and_sketched_probes_agree() -> None:
    """Streaming (palettes first, nothing stored per gradient) and sketching (gradients first) are
    the same estimator: equal errors for per-tensor, grouped and vector specs."""
    model, inputs = tiny_bert()
    specs = [
        PaletteSpec(nbits=2),
        PaletteSpec(nbits=4, granularity="per_grouped_channel", group_size=16),
        PaletteSpec(nbits=2, cluster_dim=2),
    ]
    streamed = probe_sensitivity(model, inputs, specs, n_probes=4, progress=False)
    sketched = probe_sensitivity(model, inputs, specs, n_probes=4, progress=False, keep_sketch=True)
    for name in streamed.layers:
        np.testing.assert_allclose(streamed.errors[name], sketched.errors[name], rtol=1e-5, atol=1e-12)
    grouped = probe_sensitivity(model, inputs, specs[1:2], n_probes=4, progress=False, keep_sketch=True)
    assert all(sk.kind == "values" and sk.values.rows == 16 for sk in grouped.sketch.values())
    for name in streamed.layers:
        np.testing.assert_allclose(grouped.errors[name][0], streamed.errors[name][1], rtol=1e-5, atol=1e-12)


def test_inputs_are_normalised_and_described() -> None:
    model, (ids, mask) = tiny_bert()
    one = make_probe_set(model, (ids, mask))
    many = make_probe_set(model, [(ids[:3], mask[:3]), (ids[3:], mask[3:])])
    call = make_probe_set(model, lambda m: m(ids, mask).last_hidden_state)
    with torch.no_grad():
        ref = one.units[0](model)
        assert torch.equal(torch.cat([u(model) for u in many.units]), ref)
        assert torch.equal(call.units[0](model), ref)
    synth = make_probe_set(model, n_samples=4)
    assert "random token ids" in synth.description
    with pytest.raises(ValueError, match="pass inputs="):
        make_probe_set(nn.Linear(64, 64))


def test_fp16_exact_weights_score_without_residual() -> None:
    unet = tiny_unet(fp16_weights=True)
    sens = probe_sensitivity(unet, synth(unet), keep_sketch=True, **FAST)
    assert all(float(sk.resid.abs().max()) == 0 for sk in sens.sketch.values())
    assert np.isfinite(sens.predict_psnr(sens.uniform(PaletteSpec(nbits=2))))


def test_thresholds_give_each_palettes_exact_weight_change() -> None:
    """The compact candidates (LUT thresholds on value ranks) give <g, dW> of the fitted palette
    itself: per tensor and grouped, LUTs with repeated entries (few distinct values) included."""
    from palette.cluster import fit_luts_batch, fit_palettes_batch
    from palette.probe.sketch import Streamed

    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 48, generator=gen) * 0.05
    coarse = torch.randint(-3, 4, (32, 40), generator=gen).float() * 0.25  # 7 values: 8-bit LUTs repeat entries
    for w in (dense, coarse):
        specs = [PaletteSpec(1), PaletteSpec(3), PaletteSpec(8), PaletteSpec(4, "per_grouped_channel", 16),
                 PaletteSpec(8, "per_grouped_channel", 16)]
        (luts,) = fit_luts_batch([(w, specs)])
        (pals,) = fit_palettes_batch([(w, specs, None)])
        streamed = Streamed(w, specs, dict(enumerate(luts)), {})
        gs = torch.randn(3, w.numel(), generator=gen)
        (z,) = streamed(w, gs)
        want = torch.stack([gs.double() @ (p.dequantize().double().reshape(-1) - w.double().reshape(-1))
                            for p in pals], 1)
        torch.testing.assert_close(z, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_convolutions_probe(padding: str) -> None:
    """Conv2d(padding='same' / 'valid'), with an even kernel and dilation (uneven 'same' padding):
    per-sample weight gradients equal autograd's, and the fast probe runs."""
    from palette.probe.passes import per_sample_grad

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, (4, 3), padding=padding, dilation=(2, 1))
    x = torch.randn(3, 16, 12, 12)
    y = conv(x)
    g = torch.randn_like(y)
    got = per_sample_grad(conv, x, g)
    for s in range(3):
        want = torch.autograd.grad(conv(x[s : s + 1]), conv.weight, g[s : s + 1])[0]
        torch.testing.assert_close(got[s].reshape(want.shape), want, rtol=1e-5, atol=1e-6)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(32, 16, 3, padding=padding)).eval()
    sens = probe_sensitivity(model, (x,), **FAST)
    assert len(sens.layers) == 2 and all(np.isfinite(e).all() for e in sens.errors.values())


@pytest.mark.parametrize("rows, shape, sizes", [(1, (96, 48, 3, 3), (16, 24)), (3, (96, 48, 3, 3), (16, 24)),
                                               (2, (512, 64), (16, 32))])
def test_compiled_and_torch_folds_agree(monkeypatch, rows: int, shape: tuple, sizes: tuple) -> None:
    """The CPU's compiled folds (dense sums, parallel for large layers and serial for small ones;
    prefix sums at the bounds for many groups) and the torch ops (other devices) give the same
    <g, dW> for every candidate, also for a grouping the finest does not divide."""
    from palette.cluster import fit_luts_batch
    from palette.probe import _binsum
    from palette.probe import sketch as probe_sketch

    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    specs = [PaletteSpec(nbits=b) for b in (1, 3, 8)] + [
        PaletteSpec(nbits=b, granularity="per_grouped_channel", group_size=g) for b in (2, 4) for g in sizes]
    streamed = probe_sketch.Streamed(w, specs, dict(enumerate(fit_luts_batch([(w, specs)])[0])), {})
    gs = torch.randn(rows, w.numel())
    out = {}
    for label, devices, parallel in (("parallel", ("cpu",), 0), ("serial", ("cpu",), 1 << 62), ("torch", (), 0)):
        monkeypatch.setattr(probe_sketch, "COMPILED_DEVICES", devices)
        monkeypatch.setattr(_binsum, "PARALLEL_NUMEL", parallel)
        out[label] = streamed(w, gs)[0]
    assert torch.allclose(out["parallel"], out["torch"], rtol=1e-12, atol=0)
    assert torch.allclose(out["serial"], out["torch"], rtol=1e-12, atol=0)
    exact = torch.stack([gs.double() @ (fit_palette(w, s).dequantize().reshape(-1).double() - w.reshape(-1).double())
                         for s in specs], 1)
    assert torch.allclose(out["parallel"], exact, rtol=1e-9, atol=1e-12)


def test_memory_estimate_frees_what_it_measured() -> None:
    """The estimate's forward pass is released when it returns (no reference cycle through the
    saved tensors keeps the graph alive), and it counts the layers' inputs the passes keep."""
    import gc
    import weakref

    from palette.probe.budget import activation_bytes
    from palette.recipe import target_layers

    unet = tiny_unet()
    probe = synth(unet, n=1)
    targets = target_layers(unet)
    seen: list[weakref.ref] = []
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append(weakref.ref(o))) for m in unet.modules()
             if isinstance(m, (nn.SiLU, nn.GroupNorm, nn.Linear))]
    try:
        nbytes, largest, seconds = activation_bytes(unet, probe, targets)
    finally:
        for h in hooks:
            h.remove()
    gc.collect()
    assert seen and not [r for r in seen if r() is not None]
    assert 0 < largest < nbytes and seconds > 0


def test_memory_estimate_stops_before_the_work_and_names_options(monkeypatch) -> None:
    from palette.probe import budget

    monkeypatch.setattr(budget, "available_bytes", lambda device: 1)
    with pytest.raises(ValueError, match="per_tensor.*lower probe.*fewer samples.*cuda"):
        probe_sensitivity(tiny_unet(), synth(tiny_unet()), **FAST)


@pytest.mark.parametrize("n, k", [(2, 16), (8, 4), (12, 3), (64, 2)])
def test_default_passes_follow_the_sample_count(n: int, k: int) -> None:
    """Without n_probes, about 32 random projections over all samples, at least 2 per sample."""
    model, _ = tiny_bert()
    kw = {key: v for key, v in FAST.items() if key != "n_probes"}
    sens = probe_sensitivity(model, make_probe_set(model, n_samples=n, batch_size=n), **kw)
    assert sens.n_probes == k and sens.cost.backwards == k
