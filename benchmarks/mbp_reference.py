"""Apple's mixed-bit palettization (MBP) pre-analysis, re-implemented as the baseline of
`bench_allocate.py`.

It follows ml-stable-diffusion's `python_coreml_stable_diffusion/mixed_bit_compression_pre_analysis.py`
step by step, with the "pipeline" replaced by a probe set (`palette.probe_inputs`: every unit run
once = one pipeline call, its samples = Apple's 8 prompts) and coremltools' k-means replaced by
palette's exact per-tensor k-means (the same optimum: coremltools runs exact `kmeans1d` on fp16
tensors of >= 10k elements, and every candidate here has > 1e5):

1. candidates: `nn.Linear` / `nn.Conv2d` modules whose weight has strictly more than
   `PALETTIZE_MIN_SIZE = 1e5` elements, in `named_modules()` order (Conv1d is not a candidate);
2. one reference call;
3. for nbits in (1, 2, 4, 6, 8): the single-layer sweep (palettize one candidate, call, restore:
   N calls), then the candidates sorted by descending sum over samples of their single-layer PSNR
   (a stable sort: ties keep module order), then the cumulative sweep in that order (palettize
   and keep: N calls). Every per-sample PSNR is rounded to 0.1 dB, as Apple stores it;
4. baselines "original" and "linear_8bit" (Apple's fake int8: LINEAR mode, int8, one range per
   tensor, applied to every module with a weight): 2 calls each, since Apple's
   `simulate_quant_fn` re-runs the reference too;
5. `num_recipes` thresholds `linspace(original - 1, linear_8bit + 5, num_recipes)`; each recipe
   picks per candidate the first nbits in (1, 2, 4, 6, 8) whose *cumulative* average PSNR
   (sum of rounded per-sample PSNRs / number of samples) is strictly above the threshold, else
   `default_nbits` (16); each recipe is measured by `simulate_quant_fn`: 2 calls.

Calls: 1 + 10 N + 4 + 2 num_recipes = 10 N + 19 for Apple's default of 7 recipes; `pre_analysis`
counts the calls it really makes and `bench_allocate.py` asserts that count. Two deliberate
differences, neither changing a recipe: restores are exact (Apple restores the fp16-rounded weight,
the same thing in its fp16 pipeline), and nothing is deep-copied (weights are restored in place).

How faithfulness was checked: the counted calls equal 10 N + 19 on every model benchmarked;
`_self_check()` (run by `python benchmarks/mbp_reference.py`) checks the ordering, the rounding,
the strict threshold comparison and the fallback to 16 bits on a hand-worked 3-layer example; the
k-means is palette's, whose per-tensor parity with coremltools is tested in tests/test_cluster.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from palette import PaletteSpec, fit_palettes, keep_original
from palette.metrics import psnr_per_sample

NBITS: tuple[int, ...] = (1, 2, 4, 6, 8)  # the bit-widths Apple's pre-analysis sweeps
PALETTIZE_MIN_SIZE = 1e5  # a candidate has strictly more weight elements than this
DEFAULT_NBITS = 16
NUM_RECIPES = 7

Unit = Callable[[nn.Module], torch.Tensor]


def candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Apple's `get_palettizable_modules`: Linear/Conv2d with more than 1e5 weights, module order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "weight", None) is not None
        and m.weight.numel() > PALETTIZE_MIN_SIZE
    }


def rounded_psnr(out: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per-sample PSNR rounded to 0.1 dB, as Apple stores it (`float(f"{psnr:.1f}")`)."""
    return [float(f"{p:.1f}") for p in psnr_per_sample(out, ref)]


def descending_psnr_order(results: dict[str, list[float]]) -> list[str]:
    """Least sensitive first: by descending sum of per-sample PSNR, ties in module order."""
    return [k for k, _ in sorted(results.items(), key=lambda kv: -sum(kv[1]))]


def build_recipe(
    cumulative: dict[int, dict[str, list[float]]],
    sizes: dict[str, int],
    threshold: float,
    n_samples: int,
    default_nbits: int = DEFAULT_NBITS,
) -> tuple[dict[str, int], float]:
    """Apple's `build_recipe`: {candidate: nbits} and its average bits over the candidates."""
    recipe: dict[str, int] = {}
    bits = 0
    for key in cumulative[NBITS[0]]:
        chosen = default_nbits
        for nbits in NBITS:
            if sum(cumulative[nbits][key]) / n_samples > threshold:
                chosen = nbits
                break
        recipe[key] = chosen
        bits += chosen * sizes[key]
    return recipe, bits / sum(sizes.values())


def fake_linear_int8(w: np.ndarray) -> np.ndarray:
    """Apple's `fake_linear_quantize` with its defaults (mode LINEAR, int8, axis=-1): affine over
    [min(0, lo), max(0, hi)], codes -128..127. Its reduction axes are `i != axis` for i >= 0, which
    with axis=-1 is every axis: one range per tensor."""
    lo, hi = min(0.0, float(w.min())), max(0.0, float(w.max()))
    span = hi - lo if hi > lo else 1.0  # an all-zero tensor stays zero
    zero = np.clip(np.round((-128 * hi - 127 * lo) / span), -128, 127)
    q = np.clip(np.round(w * 255 / span) + zero, -128, 127)
    return ((q - zero) * (span / 255)).astype(w.dtype)


@dataclass
class MBPAnalysis:
    """The pre-analysis results, as Apple's JSON holds them, with the calls and time it took."""

    sizes: dict[str, int]
    single: dict[int, dict[str, list[float]]]
    cumulative: dict[int, dict[str, list[float]]]  # per nbits, in that sweep's order
    baselines: dict[str, float]
    n_samples: int
    calls: int = 0
    seconds: float = 0.0
    cluster_seconds: float = 0.0
    recipes: dict[str, dict[str, int]] = field(default_factory=dict)

    def thresholds(self, num_recipes: int = NUM_RECIPES) -> np.ndarray:
        """Apple's recipe thresholds: linspace(original - 1, linear_8bit + 5, num_recipes)."""
        return np.linspace(self.baselines["original"] - 1, self.baselines["linear_8bit"] + 5, num_recipes)

    def recipe(self, threshold: float) -> tuple[dict[str, int], float]:
        return build_recipe(self.cumulative, self.sizes, threshold, self.n_samples)

    def sweep(self, step: float = 0.25) -> list[tuple[float, dict[str, int]]]:
        """(threshold, recipe) every `step` dB over the whole range of cumulative PSNRs, distinct
        recipes only (the highest threshold giving each), from the most to the fewest bits."""
        avgs = [sum(v) / self.n_samples for c in self.cumulative.values() for v in c.values()]
        out: list[tuple[float, dict[str, int]]] = []
        for t in np.arange(np.ceil(max(avgs) / step) * step, np.floor(min(avgs) / step) * step - step, -step):
            r, _ = self.recipe(float(t))
            if not out or r != out[-1][1]:
                out.append((float(t), r))
        return out


def mapping(recipe: dict[str, int]) -> dict[str, PaletteSpec | None]:
    """An Apple recipe as palette specs: per-tensor k-means at nbits, None for 16 bits."""
    return {n: None if b == DEFAULT_NBITS else PaletteSpec(b) for n, b in recipe.items()}


def pre_analysis(
    model: nn.Module, units: Sequence[Unit], *, num_recipes: int = NUM_RECIPES, progress: bool = False
) -> MBPAnalysis:
    """Run Apple's pre-analysis on `model` with `units` as the pipeline; the model is restored."""
    t0 = time.perf_counter()
    cands = candidates(model)
    if not cands:
        raise ValueError(f"{type(model).__name__} has no layer with more than {PALETTIZE_MIN_SIZE:g} weights")
    calls = 0

    @torch.no_grad()
    def run() -> torch.Tensor:
        nonlocal calls
        calls += 1
        return torch.cat([_flat(u(model)) for u in units])

    tc = time.perf_counter()
    fitted = {n: fit_palettes(m.weight, [PaletteSpec(b) for b in NBITS], name=n) for n, m in cands.items()}
    dense = {n: {b: p.dequantize().reshape(m.weight.shape) for b, p in zip(NBITS, fitted[n])}
             for n, m in cands.items()}
    del fitted
    cluster_s = time.perf_counter() - tc

    def put(name: str, nbits: int) -> None:
        w = cands[name].weight
        with torch.no_grad():
            w.copy_(dense[name][nbits].to(w.dtype))

    names = list(cands)
    ref = run()
    n_samples = ref.shape[0]
    single: dict[int, dict[str, list[float]]] = {}
    cumulative: dict[int, dict[str, list[float]]] = {}
    with keep_original(model, names):
        for nbits in NBITS:
            single[nbits] = {}
            for n in _bar(names, f"single {nbits}b", progress):
                with keep_original(model, [n]):
                    put(n, nbits)
                    single[nbits][n] = rounded_psnr(run(), ref)
            order = descending_psnr_order(single[nbits])
            cumulative[nbits] = {}
            with keep_original(model, names):
                for n in _bar(order, f"cumulative {nbits}b", progress):
                    put(n, nbits)
                    cumulative[nbits][n] = rounded_psnr(run(), ref)

    def simulate(change: Callable[[], None]) -> float:
        """Apple's `simulate_quant_fn`: run the changed model, re-run the reference (2 calls)."""
        with keep_original(model, _weighted(model)):
            change()
            out = run()
        return sum(rounded_psnr(out, run())) / n_samples

    baselines = {"original": simulate(lambda: None), "linear_8bit": simulate(lambda: _int8_all(model))}
    sizes = {n: m.weight.numel() for n, m in cands.items()}
    analysis = MBPAnalysis(sizes, single, cumulative, baselines, n_samples)
    for threshold in analysis.thresholds(num_recipes):
        recipe, bits = analysis.recipe(float(threshold))
        key = f"recipe_{bits:.2f}_bit_mixedpalette"
        analysis.baselines[key] = float(f"{simulate(lambda: [put(n, b) for n, b in recipe.items() if b != 16]):.1f}")
        analysis.recipes[key] = recipe
    analysis.calls, analysis.seconds, analysis.cluster_seconds = calls, time.perf_counter() - t0, cluster_s
    return analysis


def _flat(out: torch.Tensor) -> torch.Tensor:
    return out.detach().float().reshape(out.shape[0], -1)


def _weighted(model: nn.Module) -> list[str]:
    """Every module with a weight tensor (what Apple's int8 baseline quantizes)."""
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]


def _int8_all(model: nn.Module) -> None:
    with torch.no_grad():
        for n in _weighted(model):
            w = dict(model.named_modules())[n].weight
            w.copy_(torch.from_numpy(fake_linear_int8(w.detach().cpu().numpy())))


def _bar(items: list[str], desc: str, progress: bool):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _self_check() -> None:
    """Hand-worked recipe selection on three layers and two samples."""
    assert rounded_psnr(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))[0] > 190
    single = {"a": [30.0, 32.0], "b": [40.0, 40.0], "c": [30.0, 32.0]}
    assert descending_psnr_order(single) == ["b", "a", "c"]  # 80 > 62 = 62, ties in module order
    # cumulative average PSNR per layer: 1 bit (b, a, c): 35, 20, 10; 2 bits: 45, 35, 30; 4 bits:
    # 60, 50, 40 (exactly 40.0 for c); 6 and 8 bits: 70, 65, 45.
    cum = {1: {"b": [35, 35], "a": [20, 20], "c": [10, 10]}, 2: {"b": [45, 45], "a": [35, 35], "c": [30, 30]},
           4: {"b": [60, 60], "a": [50, 50], "c": [40, 40]}, 6: {"b": [70, 70], "a": [65, 65], "c": [45, 45]},
           8: {"b": [70, 70], "a": [65, 65], "c": [45, 45]}}
    sizes = {"a": 100, "b": 300, "c": 100}
    recipe, bits = build_recipe(cum, sizes, 40.0, 2)
    assert recipe == {"b": 2, "a": 4, "c": 6}, recipe  # c: 40 is not > 40, so 6 bits
    assert bits == (2 * 300 + 4 * 100 + 6 * 100) / 500
    recipe, _ = build_recipe(cum, sizes, 50.0, 2)
    assert recipe == {"b": 4, "a": 6, "c": 16}, recipe  # c never exceeds 50: Apple's default 16
    w = np.array([[0.5, -1.0], [0.25, 0.0]], dtype=np.float32)
    # range [-1, 0.5]: step 1.5 / 255, zero point (-128 * 0.5 + 127) / 1.5 = 42; 0 stays exact
    q = fake_linear_int8(w)
    assert np.abs(q - w).max() <= 0.75 / 255 + 1e-7 and q[1, 1] == 0.0
    print("mbp_reference self-check passed")


if __name__ == "__main__":
    _self_check()
