"""Sensitivity probing benchmark: the fast estimator against the exhaustive (Apple MBP style) one.

Per model (all-MiniLM-L6-v2 with its pretrained weights, the default model when its weights are
present, a tiny random diffusers UNet), on one data-free probe set, with the candidates that
`allocate_bits` probes by default (nbits 1/2/3/4/6/8 x per_tensor and per_grouped_channel g16):
- Spearman rank correlation of fast-predicted vs exhaustively measured per-layer errors, 4 and 2 bits;
- whole-model latent PSNR, additive prediction vs measured, for uniform 4-bit and for a mixed
  mapping (the more sensitive half of the layers at 6 bits, the rest at 3 bits);
- cost, fast vs exhaustive, in forward-equivalents and seconds.
`--sd15`: the fast probe on the full-size Stable Diffusion 1.5 UNet architecture (random weights
scaled to fan-in, 64x64 latents): wall time and peak memory.

    python -m benchmarks.bench_sensitivity [--probes 4 8] [--threads 1] [--only default] [--sd15]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

from palette.metrics import spearman
from palette.probe import ProbeSet, Sensitivity, make_probe_set, measure, probe_sensitivity
from palette.recipe import Candidates, target_layers
from palette.spec import PaletteSpec


GRANULARITIES = ("per_tensor", "per_grouped_channel")


def tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    ).eval()


def measured_psnr(model: nn.Module, probe: ProbeSet, mapping: dict[str, PaletteSpec]) -> float:
    """Apple PSNR of the model palettized with `mapping` against the unmodified model, same probes."""
    return measure(model, mapping, probe).psnr


def mixed_mapping(sens: Sensitivity) -> dict[str, PaletteSpec]:
    """The more sensitive half of the layers (by 4-bit error) at 6 bits, the rest at 3 bits."""
    s4 = PaletteSpec(nbits=4)
    order = sorted(sens.layers, key=lambda n: sens.error(n, s4), reverse=True)
    half = set(order[: len(order) // 2])
    return {n: PaletteSpec(nbits=6 if n in half else 3) for n in sens.layers}


def bench_model(label: str, model: nn.Module, probe: ProbeSet, probes: list[int]) -> list[str]:
    """Rows of the results table for one model."""
    kw = dict(progress=False, candidates=Candidates(granularities=GRANULARITIES))
    exh = probe_sensitivity(model, probe, method="exhaustive", **kw)
    names = list(exh.layers)
    s4, s2 = PaletteSpec(nbits=4), PaletteSpec(nbits=2)
    uniform = exh.uniform(s4)
    meas_u = measured_psnr(model, probe, uniform)
    rows = []
    for k in probes:
        fast = probe_sensitivity(model, probe, n_probes=k, **kw)
        mixed = mixed_mapping(fast)
        meas_m = measured_psnr(model, probe, mixed)
        rho4 = spearman([fast.error(n, s4) for n in names], [exh.error(n, s4) for n in names])
        rho2 = spearman([fast.error(n, s2) for n in names], [exh.error(n, s2) for n in names])
        fe = exh.cost.forward_equivalents / fast.cost.forward_equivalents
        sec = exh.cost.seconds / fast.cost.seconds
        rows.append(
            f"| {label} | {len(names)} | {k} | {rho4:.3f} | {rho2:.3f} "
            f"| {fast.predict_psnr(uniform):.2f} / {exh.predict_psnr(uniform):.2f} / {meas_u:.2f} "
            f"| {fast.predict_psnr(mixed):.2f} / {exh.predict_psnr(mixed):.2f} / {meas_m:.2f} "
            f"| {fast.cost.forward_equivalents:.0f} / {exh.cost.forward_equivalents:.0f} = {fe:.1f}x "
            f"| {fast.cost.seconds:.1f} / {exh.cost.seconds:.1f} = {sec:.1f}x |"
        )
        print(rows[-1], flush=True)
    return rows


HEADER = (
    "| model | layers | K | Spearman 4b | Spearman 2b | PSNR uniform 4b: fast / exh. additive / measured "
    "| PSNR mixed 6b+3b: fast / exh. additive / measured | forward-eq. fast / exh. | seconds fast / exh. |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def models(only: list[str] | None) -> list[tuple[str, nn.Module, ProbeSet]]:
    from palette.models.minilm import load_minilm

    out = []
    minilm, tok = load_minilm()
    out.append(("all-MiniLM-L6-v2 (pretrained)", minilm, make_probe_set(minilm, tokenizer=tok, n_samples=16)))
    try:
        from palette.models.default import default_probe_inputs, load_unet

        unet = load_unet()
        out.append(("default model (trained UNet)", unet, make_probe_set(unet, default_probe_inputs(n=4, seed=0))))
    except (OSError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"default model not available ({type(e).__name__}: {str(e)[:120]}); skipped", flush=True)
    tiny = tiny_unet()
    out.append(("tiny random UNet", tiny, make_probe_set(tiny)))
    return [m for m in out if not only or any(o in m[0] for o in only)]


def sd15(probes: int, n_samples: int, granularities: tuple[str, ...]) -> None:
    from palette.models.zoo import build

    t0 = time.perf_counter()
    unet = build("sd15-unet")  # random weights scaled to fan-in: N(0, 1/fan_in)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"SD1.5 UNet: {n_params / 1e6:.0f}M parameters, {len(target_layers(unet))} target layers, "
          f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    t1 = time.perf_counter()
    sens = probe_sensitivity(unet, make_probe_set(unet, n_samples=n_samples, batch_size=1),
                             Candidates(granularities=granularities), n_probes=probes)
    wall = time.perf_counter() - t1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_gb = usage.ru_maxrss * 1024 / 1e9
    cpu = usage.ru_utime + usage.ru_stime
    s4 = PaletteSpec(nbits=4)
    print(f"SD1.5 fast probe: K={probes}, {n_samples} samples (one per unit), {'+'.join(granularities)}, {len(sens.layers)} layers x {len(sens.specs)} specs: "
          f"{wall:.0f} s wall ({sens.cost.cluster_seconds:.0f} s clustering), {cpu:.0f} CPU-s in the process, "
          f"peak RSS {peak_gb:.2f} GB; "
          f"{sens.cost.forward_equivalents:.0f} forward-eq. vs exhaustive "
          f"{1 + sum(sum(b is not None for b in v) for v in sens.nbytes.values())}; "
          f"predicted uniform-4b PSNR {sens.predict_psnr(sens.uniform(s4)):.2f} dB", flush=True)
    print(f"inputs: {sens.inputs_description}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, nargs="+", default=[4, 8], help="K values for the fast probe")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", nargs="+", help="models whose label contains one of these words")
    ap.add_argument("--sd15", action="store_true", help="only the SD1.5-scale fast probe")
    ap.add_argument("--sd15-probes", type=int, default=8)
    ap.add_argument("--sd15-samples", type=int, default=2)
    ap.add_argument("--sd15-granularities", nargs="+", default=["per_tensor"], choices=GRANULARITIES)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sd15:
        sd15(args.sd15_probes, args.sd15_samples, tuple(args.sd15_granularities))
        return
    print(HEADER, flush=True)
    for label, model, probe in models(args.only):
        bench_model(label, model, probe, args.probes)


if __name__ == "__main__":
    main()
