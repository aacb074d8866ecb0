"""Sensitivity probing: how few probe samples and backward passes suffice (issue 17's accuracy-vs-
cost curve that sets the defaults), against the exhaustive (Apple MBP style) reference.

Per model (the default UNet with its trained weights, all-MiniLM-L6-v2 with its pretrained ones),
with the candidates `allocate_bits` probes by default (nbits 1/2/3/4/6/8 x per_tensor and
per_grouped_channel g16):
- the reference: the exhaustive probe on the largest probe set (every layer and spec measured);
- for every number of samples S and passes K: the fast probe on a data-free probe set of S
  samples: Spearman rank correlation of its per-layer errors against the reference at 4 and 2
  bits; the recipes it allocates at 4 and 3 bits per weight, measured on held-out inputs, beside
  the reference's recipes (same budget, same held-out inputs);
- its cost: wall seconds (clustering included), forward-equivalents, and Apple MBP's on the same
  probe set: 10 N + 19 passes over it (N: layers above 1e5 weights), in seconds from the forward
  time measured here, and in forward-equivalents.

    python benchmarks/bench_sensitivity.py                      # both models, the full grid
    python benchmarks/bench_sensitivity.py --models default --samples 2 4 --probes 1 2 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from palette import Candidates, PaletteSpec, ProbeSet, allocate_bits, make_probe_set, measure  # noqa: E402
from palette.metrics import spearman  # noqa: E402
from palette.probe import probe_sensitivity  # noqa: E402
from palette.probe.measure import outputs  # noqa: E402
from palette.recipe import APPLE_MIN_NUMEL  # noqa: E402

SEED = 0
CANDIDATES = Candidates()


def default_model() -> tuple[torch.nn.Module, Callable[[int, int], ProbeSet], Any, str]:
    """The default UNet; probe sets of S samples (`default_probe_inputs`: S // 6 held-out scenes
    at 6 timesteps, at least one scene); held-out inputs (other scenes and noise)."""
    from palette.models.default import default_probe_inputs, load_unet

    unet = load_unet()

    def probe(samples: int, seed: int) -> ProbeSet:
        return make_probe_set(unet, default_probe_inputs(n=max(1, samples // 6), seed=seed))

    return unet, probe, default_probe_inputs(n=4, seed=7), "samples = scenes x 6 timesteps"


def minilm() -> tuple[torch.nn.Module, Callable[[int, int], ProbeSet], Any, str]:
    """all-MiniLM-L6-v2; probe sets of the first S built-in prompts; the other prompts held out."""
    from palette.models.minilm import load_minilm
    from palette.probe import PROMPTS

    model, tok = load_minilm()

    def probe(samples: int, seed: int) -> ProbeSet:
        return make_probe_set(model, seed=seed, n_samples=samples, tokenizer=tok)

    t = tok(list(PROMPTS[8:16]), padding="longest", return_tensors="pt")
    return model, probe, {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}, "samples = prompts"


MODELS = {"default": default_model, "minilm": minilm}


def run(key: str, samples: list[int], probes: list[int]) -> list[str]:
    model, make, held_out, note = MODELS[key]()
    big = make(max(samples), SEED)
    t0 = time.perf_counter()
    exh = probe_sensitivity(model, big, CANDIDATES, method="exhaustive", progress=False)
    exh_s = time.perf_counter() - t0
    names = list(exh.layers)
    n_mbp = sum(exh.layers[n].numel >= APPLE_MIN_NUMEL for n in names)
    refs = {b: measure(model, allocate_bits(model, budget_bits=b, sensitivity=exh, progress=False, calibrate=False),
                       held_out).psnr for b in (4.0, 3.0)}
    print(f"\n{key}: {len(names)} layers x {len(exh.specs)} specs, {n_mbp} above 1e5 weights ({note}); exhaustive "
          f"reference on {len(exh.peak)} samples: {exh.cost.forward_equivalents:g} forward-eq., {exh_s:.0f} s; "
          f"its recipes on held-out inputs: 4 bits {refs[4.0]:.2f} dB, 3 bits {refs[3.0]:.2f} dB", flush=True)
    s4, s2 = PaletteSpec(4), PaletteSpec(2)
    rows = []
    for n in samples:
        probe = make(n, SEED)
        t1 = time.perf_counter()
        with torch.no_grad():
            outputs(model, probe)
        forward_s = time.perf_counter() - t1
        for k in probes:
            t2 = time.perf_counter()
            fast = probe_sensitivity(model, probe, CANDIDATES, n_probes=k, seed=SEED, progress=False)
            fast_s = time.perf_counter() - t2
            rho4 = spearman([fast.error(x, s4) for x in names], [exh.error(x, s4) for x in names])
            rho2 = spearman([fast.error(x, s2) for x in names], [exh.error(x, s2) for x in names])
            got = {b: measure(model, allocate_bits(model, budget_bits=b, sensitivity=fast, progress=False,
                                                   calibrate=False), held_out).psnr for b in (4.0, 3.0)}
            mbp_fe, fe = 10 * n_mbp + 19, fast.cost.forward_equivalents
            mbp_s = mbp_fe * forward_s
            rows.append(
                f"| {key} | {len(fast.peak)} | {k} | {rho4:.3f} | {rho2:.3f} | {got[4.0]:.2f} ({got[4.0] - refs[4.0]:+.2f}) "
                f"| {got[3.0]:.2f} ({got[3.0] - refs[3.0]:+.2f}) | {fast_s:.1f} ({fast.cost.cluster_seconds:.1f}) "
                f"| {fe:g} / {mbp_fe} = {mbp_fe / fe:.0f}x | {mbp_s:.0f} / {fast_s:.1f} = {mbp_s / fast_s:.1f}x |"
            )
            print(rows[-1], flush=True)
    return rows


HEADER = (
    "| model | samples | K | Spearman 4b | Spearman 2b | recipe 4 bits, dB (vs exh.) | recipe 3 bits, dB (vs exh.) "
    "| fast s (clustering) | forward-eq. MBP / fast | seconds MBP (est.) / fast |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--samples", type=int, nargs="+", default=None,
                    help="probe samples (default: default 6 12 24 48, minilm 2 4 8 16)")
    ap.add_argument("--probes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="backward passes K")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    for key in args.models:
        samples = args.samples or {"default": [6, 12, 24, 48], "minilm": [2, 4, 8, 16]}[key]
        rows += run(key, samples, args.probes)
    print("\n" + HEADER)
    print("\n".join(rows))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
