"""The embedded default model: data, checker, loading, caption following, fp16, determinism."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from palette.models import checker as checker_mod
from palette.models.data import ATTRIBUTES, render, sample_scenes, split_scenes
from palette.models.default import (
    WEIGHTS_DIR,
    default_probe_inputs,
    encode_prompts,
    generate,
    load_default,
    load_unet,
)
from palette.models.evaluate import caption_following, random_weights


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    """PSNR of uint8 images (peak 255)."""
    mse = np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def pipe():
    return load_default()


def test_data_is_deterministic_and_varied() -> None:
    scenes = sample_scenes(16, seed=3)
    assert scenes == sample_scenes(16, seed=3)
    a, b = render(scenes, seed=5), render(scenes, seed=5)
    assert a.dtype == np.uint8 and a.shape == (16, 32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(scenes, seed=6))  # jitter depends on the seed
    assert len({s.caption for s in sample_scenes(200, seed=0, split="all")}) > 100


def test_held_out_captions_are_unseen_but_their_parts_are_seen() -> None:
    train, held = split_scenes()
    assert len(held) >= 64 and not set(train) & set(held)
    assert len(train) + len(held) == int(np.prod([len(v) for v in ATTRIBUTES.values()]))
    pairs = {(i, j, s.as_tuple()[i], s.as_tuple()[j]) for s in train for i, j in itertools.combinations(range(5), 2)}
    for s in held:
        for i, j in itertools.combinations(range(5), 2):
            assert (i, j, s.as_tuple()[i], s.as_tuple()[j]) in pairs


def test_checker_reads_fresh_procedural_images() -> None:
    scenes = sample_scenes(500, seed=424242, split="all")
    res = checker_mod.score(render(scenes, seed=424242), scenes)
    assert all(res[k] >= 0.95 for k in ATTRIBUTES), res
    assert res["shape+colour"] >= 0.95, res
    # Against shuffled captions the same images score near chance: the checker can say no.
    wrong = checker_mod.score(render(scenes, seed=424242), scenes[1:] + scenes[:1])
    assert wrong["shape+colour"] < 0.2, wrong


def test_minilm_embeddings() -> None:
    e = encode_prompts(["a small red circle in the top left on a black background", "a large blue cross"])
    assert e.shape == (2, 16, 384) and e.dtype == torch.float32
    assert not torch.allclose(e[0], e[1])


def test_weights_are_small_and_load_with_diffusers() -> None:
    """The load time is a benchmark (benchmarks/bench_load.py), not a timed test."""
    unet = load_unet()
    assert (WEIGHTS_DIR / "diffusion_pytorch_model.safetensors").stat().st_size <= 20 * 2**20
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(layers) >= 30
    kinds = {type(m).__name__ for m in unet.modules()}
    assert {"ResnetBlock2D", "Transformer2DModel", "FeedForward", "TimestepEmbedding"} <= kinds


def test_caption_following_trained_vs_random(pipe) -> None:
    held = list(split_scenes()[1])
    trained = caption_following(pipe, held, steps=20, seed=0)
    rand = caption_following(random_weights(pipe), held, steps=20, seed=0)
    ch = checker_mod.chance()
    print(f"\nshape+colour on {len(held)} held-out captions: trained {trained['shape+colour']:.1%}, "
          f"random weights {rand['shape+colour']:.1%}, chance {ch['shape+colour']:.1%}")
    assert trained["shape+colour"] >= 0.80, trained
    assert rand["shape+colour"] <= ch["shape+colour"] + 0.10, rand


def test_fp16_weights_match_fp32(pipe) -> None:
    prompts = [s.caption for s in split_scenes()[1][:8]]
    ref = pipe(prompts, steps=20, seed=1)
    half = dataclasses.replace(pipe, unet=load_unet().half().float())  # fp16-rounded weights
    value = psnr(half(prompts, steps=20, seed=1), ref)
    print(f"\nfp16 weights vs fp32: {value:.1f} dB")
    assert value >= 35.0


def test_same_seed_bit_identical(pipe) -> None:
    prompts = ["a large green square in the bottom right on a white background", "a small cyan triangle"]
    a = generate(prompts, steps=20, seed=7, pipeline=pipe)
    b = generate(prompts, steps=20, seed=7, pipeline=load_default())
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, generate(prompts, steps=20, seed=8, pipeline=pipe))


def test_probe_inputs_drive_the_unet(pipe) -> None:
    inputs = default_probe_inputs(n=4, seed=0, pipeline=pipe)
    assert len(inputs) >= 4
    stds = []
    for sample, t, cond in inputs:
        assert sample.shape == (4, 3, 32, 32) and t.shape == (4,) and cond.shape == (4, 16, 384)
        with torch.no_grad():
            out = pipe.unet(sample, t, encoder_hidden_states=cond).sample
        assert out.shape == sample.shape and torch.isfinite(out).all()
        stds.append(float(sample.std()))
    assert max(stds) - min(stds) > 0.1  # different noise levels, not one timestep repeated
