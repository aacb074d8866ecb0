"""The mission's call at Stable Diffusion scale (issue 17): `allocate_bits(unet, budget_gb=...)` on
the full-size SD 1.5 and SDXL UNet architectures (diffusers configs, random fan-in-scaled weights:
time and memory only, nothing here measures quality).

    python benchmarks/bench_scale.py --model sd15                       # the defaults, on the CPU
    python benchmarks/bench_scale.py --model sdxl --sample-size 64 --samples 2
    python benchmarks/bench_scale.py --model sd15 --device cuda         # ready for a GPU
    python benchmarks/bench_scale.py --model sd15-narrow                # about 30 MBP candidates

Prints the probe's own estimate (peak memory, time) beside what the process measured (peak RSS from
the kernel, or the CUDA allocator's peak; wall time), the probe's forward-equivalents, and Apple's
MBP cost on the same model and probe set: 10 N + 19 passes over it, N the layers above 1e5
weights, in seconds from the forward time measured here (MBP itself is not run at this scale).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from palette import Candidates, allocate_bits, make_probe_set, target_layers  # noqa: E402
from palette.models.zoo import build  # noqa: E402
from palette.probe import probe_sensitivity  # noqa: E402
from palette.probe.measure import outputs  # noqa: E402
from palette.recipe import APPLE_MIN_NUMEL  # noqa: E402

# architecture, budget GB, config overrides. sd15-narrow: SD 1.5's layout at a tenth of its widths
# and one layer per block, 157 target layers of which 27 above 1e5 weights (MBP's candidates)
MODELS = {"sd15": ("sd15-unet", 1.5, {}), "sdxl": ("sdxl-unet", 2.0, {}),
          "sd15-narrow": ("sd15-unet", 0.008, {"block_out_channels": (32, 64, 128, 256), "layers_per_block": 1})}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="sd15")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or mps: the model and the probe run there")
    ap.add_argument("--samples", type=int, default=None, help="probe samples (default: palette's)")
    ap.add_argument("--probes", type=int, default=None, help="backward passes per sample (default: palette's)")
    ap.add_argument("--sample-size", type=int, default=None, help="probe latent size (default: the config's)")
    ap.add_argument("--granularity", nargs="+", default=None, help="candidate granularities (default: both)")
    ap.add_argument("--budget-gb", type=float, default=None)
    ap.add_argument("--cache", default=None, help="probe cache directory (resumable)")
    args = ap.parse_args()
    arch, budget, overrides = MODELS[args.model]
    device = torch.device(args.device)
    t0 = time.perf_counter()
    unet = build(arch, device=device, overrides=overrides)
    params = sum(p.numel() for p in unet.parameters())
    targets = target_layers(unet)
    n_mbp = sum(m.weight.numel() >= APPLE_MIN_NUMEL for m in targets.values())
    print(f"{arch}: {params / 1e6:.0f}M parameters, {len(targets)} target layers ({n_mbp} above 1e5 weights), "
          f"built on {device} in {time.perf_counter() - t0:.0f} s; threads {torch.get_num_threads()}", flush=True)
    kw = {} if args.samples is None else {"n_samples": args.samples}
    probe = make_probe_set(unet, sample_size=args.sample_size, batch_size=1, **kw)
    cands = Candidates() if args.granularity is None else Candidates(granularities=tuple(args.granularity))
    pkw = {} if args.probes is None else {"n_probes": args.probes}
    t1 = time.perf_counter()
    sens = probe_sensitivity(unet, probe, cands, cache=args.cache, **pkw)
    probe_s = time.perf_counter() - t1
    recipe = allocate_bits(unet, budget_gb=args.budget_gb or budget, sensitivity=sens, inputs=probe,
                           candidates=cands, progress=False)
    wall = time.perf_counter() - t1
    est = sens.cost.estimate
    t2 = time.perf_counter()
    with torch.no_grad():
        outputs(unet, probe)
    forward_s = time.perf_counter() - t2
    mbp = 10 * n_mbp + 19
    fe = sens.cost.forward_equivalents + 2  # the probe and the calibration's two passes
    print(f"inputs: {sens.inputs_description}")
    print("| model | samples x K | estimate: peak / time | measured: peak / probe / allocate_bits | "
          "forward-eq. palette / MBP | seconds palette / MBP (est.) |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.model} ({device}) | {len(sens.peak)} x {sens.n_probes} | {est.peak / 1e9:.1f} GB / "
          f"{est.seconds / 60:.1f} min | {peak_memory_gb(device):.2f} GB / {probe_s / 60:.1f} min / {wall / 60:.1f} min | "
          f"{fe:g} / {mbp} = {mbp / fe:.0f}x | {wall:.0f} / {mbp * forward_s:.0f} = {mbp * forward_s / wall:.1f}x |")
    print(f"recipe: {recipe.size_bytes / 1e9:.3f} GB ({recipe.bits_per_weight:.2f} bits/weight), "
          f"{len(recipe.palettized)} layers palettized; clustering {sens.cost.cluster_seconds:.0f} s; "
          f"one forward over the probe set {forward_s:.1f} s")


if __name__ == "__main__":
    main()
