"""Clustering speed and quality: palette vs coremltools' k-means, side by side, in one run.

    python benchmarks/bench_cluster.py            # conv tensor + all-MiniLM-L6-v2 + SD 1.5 UNet
    python benchmarks/bench_cluster.py --skip-sd15

coremltools is called as its palettize_weights pass calls it: `_get_kmeans_lookup_table_and_weight`
tensor by tensor, group by group (exact `kmeans1d` for fp16 groups of >= 10,000 elements, which
needs the kmeans1d package; scikit-learn's k-means below that). palette fits all requested
bit-widths of a layout from one histogram per group where a run asks for several.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.coreml_reference import coreml_kmeans_groups  # noqa: E402
from palette import NBITS, PaletteSpec, fit_palettes, target_layers  # noqa: E402

BENCH_NBITS = (2, 4, 6, 8)


def spec_for(nbits: int, granularity: str) -> PaletteSpec:
    return PaletteSpec(nbits, granularity, 16 if granularity == "per_grouped_channel" else None)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def mse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - ref.astype(np.float64)) ** 2))


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def bench_conv() -> None:
    print("\n## 1280x1280x3x3 fp16 conv weight, Student-t(5) x 0.02\n")
    rng = np.random.default_rng(0)
    w16 = (rng.standard_t(5, size=(1280, 1280, 3, 3)) * 0.02).astype(np.float16)
    w = torch.from_numpy(w16)
    fit_palettes(w[:16], [spec_for(8, "per_tensor")])  # compile outside the timings
    print("| granularity | nbits | coremltools s | palette s | speed-up | coremltools MSE | palette MSE | MSE ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for gran in ("per_tensor", "per_grouped_channel"):
        ups = []
        for nbits in BENCH_NBITS:
            ref, t_ref = timed(lambda: coreml_kmeans_groups(w16, nbits, 16 if gran != "per_tensor" else None))
            (pal,), t_pal = timed(lambda: fit_palettes(w, [spec_for(nbits, gran)]))
            m_ref, m_pal = mse(ref, w16), mse(pal.dequantize().numpy(), w16)
            ups.append(t_ref / t_pal)
            print(f"| {gran} | {nbits} | {t_ref:.2f} | {t_pal:.3f} | {t_ref / t_pal:.1f}x | "
                  f"{m_ref:.4e} | {m_pal:.4e} | {m_pal / m_ref:.6f} |")
        print(f"| {gran} | geomean | | | {geomean(ups):.1f}x (min {min(ups):.1f}x) | | | |")


def bench_minilm(granularities: tuple[str, ...]) -> None:
    from palette.models.minilm import load_minilm

    print("\n## all-MiniLM-L6-v2 (real pretrained weights), whole model, all six bit-widths\n")
    model, _ = load_minilm()
    layers = {n: m.weight.detach().to(torch.float16) for n, m in target_layers(model).items()}
    print(f"{len(layers)} target layers, {sum(w.numel() for w in layers.values()) / 1e6:.1f}M weights\n")
    print("| granularity | coremltools s (6 runs, one per nbits) | palette s (one pass) | speed-up | max MSE ratio palette/coremltools |")
    print("|---|---|---|---|---|")
    for gran in granularities:
        specs = [spec_for(b, gran) for b in NBITS]
        t_ref = t_pal = 0.0
        worst = 0.0
        for w in layers.values():
            w16 = w.numpy()
            pals, dt = timed(lambda: fit_palettes(w, specs))
            t_pal += dt
            for spec, pal in zip(specs, pals):
                ref, dt = timed(lambda: coreml_kmeans_groups(w16, spec.nbits, spec.group_size))
                t_ref += dt
                worst = max(worst, mse(pal.dequantize().numpy(), w16) / max(mse(ref, w16), 1e-30))
        print(f"| {gran} | {t_ref:.1f} | {t_pal:.2f} | {t_ref / t_pal:.1f}x | {worst:.6f} |")


def sd15_weights():
    """SD 1.5 UNet layer shapes (diffusers config, no weights) with seeded fan-in-scaled fp16
    weights, generated one layer at a time."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    gen = torch.Generator().manual_seed(0)
    for name, module in target_layers(unet).items():
        shape = tuple(module.weight.shape)
        fan_in = math.prod(shape[1:])
        yield name, (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(torch.float16)


def bench_sd15(sample_every: dict[str, int], granularities: tuple[str, ...]) -> None:
    print("\n## Stable Diffusion 1.5 UNet architecture (random fan-in-scaled fp16 weights), all six bit-widths\n")
    rows = []
    for gran in granularities:
        specs = [spec_for(b, gran) for b in NBITS]
        t_pal = 0.0
        t_ref_sample = numel_sample = numel_all = 0
        n_layers = 0
        for i, (name, w) in enumerate(sd15_weights()):
            if gran == "per_grouped_channel" and w.shape[0] % 16:
                specs_l = [spec_for(b, "per_tensor") for b in NBITS]  # conv_out: 4 channels
            else:
                specs_l = specs
            _, dt = timed(lambda: fit_palettes(w, specs_l))
            t_pal += dt
            numel_all += w.numel()
            n_layers += 1
            if i % sample_every[gran] == 0:
                w16 = w.numpy()
                for spec in specs_l:
                    _, dt = timed(lambda: coreml_kmeans_groups(w16, spec.nbits, spec.group_size))
                    t_ref_sample += dt
                numel_sample += w.numel()
        t_ref = t_ref_sample * numel_all / numel_sample
        rows.append((gran, n_layers, numel_all, t_pal, t_ref, t_ref_sample, numel_sample))
    print("| granularity | layers | weights | palette s (measured) | coremltools s (extrapolated) | speed-up | coremltools sample |")
    print("|---|---|---|---|---|---|---|")
    for gran, n, numel, t_pal, t_ref, t_s, n_s in rows:
        print(f"| {gran} | {n} | {numel / 1e6:.0f}M | {t_pal:.1f} | {t_ref:.0f} | {t_ref / t_pal:.0f}x | "
              f"{t_s:.0f} s on {n_s / 1e6:.0f}M weights |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-conv", action="store_true")
    parser.add_argument("--granularity", choices=("per_tensor", "per_grouped_channel"), action="append",
                        help="restrict the MiniLM and SD 1.5 runs to these (default: both)")
    parser.add_argument("--sd15-sample-every", type=int, default=12,
                        help="time coremltools on every Nth SD 1.5 layer and extrapolate by element count")
    parser.add_argument("--sd15-sample-every-grouped", type=int, default=48,
                        help="the same for per_grouped_channel (scikit-learn groups: far slower)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"palette vs coremltools k-means, {torch.get_num_threads()} threads")
    if not args.skip_conv:
        bench_conv()
    grans = tuple(args.granularity or ("per_tensor", "per_grouped_channel"))
    if not args.skip_minilm:
        bench_minilm(grans)
    if not args.skip_sd15:
        every = {"per_tensor": args.sd15_sample_every, "per_grouped_channel": args.sd15_sample_every_grouped}
        bench_sd15(every, grans)


if __name__ == "__main__":
    main()
