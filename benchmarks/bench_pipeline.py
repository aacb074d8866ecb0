"""One budget for the whole pipeline: joint allocation (every layer of the text encoder and the
denoiser in one knapsack, judged on the generated image) against per-component allocation.

    python benchmarks/bench_pipeline.py            # the default pipeline (MiniLM + UNet)
    python benchmarks/bench_pipeline.py --fast     # a smoke run (tiny probe, few prompts)
    python benchmarks/bench_pipeline.py --budgets 2.5               # only that row (and every caption check)
    python benchmarks/bench_pipeline.py --budgets none --caption-budgets 2.5  # only caption following

At three total budgets (uniform 4-bit per-tensor k-means of both components, 3.0 and 2.5 bits per
target weight over both, LUTs included; every other parameter at 16 bits) it measures:
- joint: `allocate_pipeline` (probe of the whole pipeline: 64 training-split captions with seeds
  0.., 4 DPM-Solver++ steps, guidance 3; one knapsack; the measured correction and calibration on
  the probe runs, its defaults); "uncorrected": the same without the correction (`refine=0`);
- uniform: per-tensor k-means at the bits that fit (4, 3, 2: the largest within the budget);
- proportional: palette's per-component allocation (the UNet probed on its latents, MiniLM on its
  hidden states, as `palette allocate` does, each on about as many samples as the joint probe) with
  the room for palettized weights split in proportion to the components' weight counts (the same
  bits per weight in each);
- swept: the same per-component allocations at 7 fractions of the room given to the text encoder
  (evenly over the feasible range); the best one, chosen on the held-out images themselves (an
  oracle no user has).
Image PSNR (uint8, peak 255, per image, averaged) against the 16-bit pipeline on held-out captions
(set A), same seeds, 20 steps; caption following (the checker) of the joint recipe's samples beside
16-bit. Selection on the test set: every recipe also on a second, disjoint set of held-out captions
(set B, never used to choose anything), and measured on the probe runs (Apple's PSNR, 4 steps: what
a user can measure), so the split chosen on A, the split the probe runs choose, and the joint
recipe are compared on B.
It also prints how well the additive prediction holds (Apple's PSNR on the float images: additive
sum at 4 steps, measured at 4 steps on the probe runs, measured at 20 steps on held-out captions).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from palette import Candidates, PaletteSpec, Recipe, make_probe_set, probe_sensitivity  # noqa: E402
from palette.experiments import feasible_fractions, proportional_fraction, split_allocation  # noqa: E402
from palette.palettize import palettized  # noqa: E402
from palette.probe import Measurement  # noqa: E402
from palette.probe.measure import outputs  # noqa: E402
from palette.probe.pipeline_inputs import PIPELINE_SAMPLES, PROBE_STEPS  # noqa: E402
from palette.demo import image_psnr  # noqa: E402
from palette.models.checker import score  # noqa: E402
from palette.models.data import split_scenes  # noqa: E402
from palette.models.default import default_probe_inputs, load_default  # noqa: E402
from palette.pipeline import PipelineRecipe, allocate_pipeline, pipeline_model  # noqa: E402
from palette.cluster import fit_palettes_batch  # noqa: E402
from palette.probe.run import applicable  # noqa: E402
from palette.recipe import batches, target_layers  # noqa: E402

MB = 1e6
SEED = 0
NBITS = (1, 2, 3, 4, 6, 8)


@dataclasses.dataclass(frozen=True)
class Settings:
    samples: int  # probe prompts of the joint probe
    probes: int
    steps: int  # sampler steps of the joint probe
    unet_samples: int  # default_probe_inputs scenes (x 6 timesteps); MiniLM's own probe: 6x as many texts
    prompts: int  # held-out captions for image PSNR
    caption_prompts: int  # held-out captions for caption following (the first ones: set A is among them)
    second_prompts: int  # held-out captions of set B (after the caption-following ones)
    fractions: int
    granularities: tuple[str, ...]


# Every allocation probes about the same number of samples: the joint probe the library's default
# prompts, each component its own (the UNet 6 timesteps per scene, MiniLM as many texts).
FULL = Settings(PIPELINE_SAMPLES, 2, PROBE_STEPS, -(-PIPELINE_SAMPLES // 6), 12, 36, 36, 7,
                ("per_tensor", "per_grouped_channel"))
FAST = Settings(2, 2, 2, 1, 4, 8, 4, 3, ("per_tensor",))
BUDGETS = {"u4": "uniform 4-bit size", "3": "3.0 bits", "2.5": "2.5 bits"}  # option value -> row label


def budget_list(text: str) -> list[str]:
    """`--budgets 3,2.5` -> the rows' labels, in the table's order; `none`: no row."""
    if text.strip().lower() == "none":
        return []
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BUDGETS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown budget(s) {unknown or text!r}: choose from {', '.join(BUDGETS)} "
                                         "(u4: the size of uniform 4-bit), comma-separated, or none")
    return [label for k, label in BUDGETS.items() if k in keys]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    every = ",".join(BUDGETS)
    ap.add_argument("--budgets", type=budget_list, default=budget_list(every),
                    help=f"the image-PSNR rows to measure (default {every}; none: only caption following)")
    ap.add_argument("--caption-budgets", type=budget_list, default=budget_list(every),
                    help=f"the joint recipes whose caption following is checked beside 16-bit (default {every}; "
                         "none: no caption check)")
    ap.add_argument("--cache", type=Path, help="a folder for the probes' caches: a rerun resumes them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = FAST if args.fast else FULL
    t0 = time.perf_counter()
    pipe = load_default()
    comps = {"text_encoder": pipe.text_encoder, "unet": pipe.unet}
    cands = Candidates(NBITS, cfg.granularities, group_size=16)
    train, held = split_scenes()
    probe_prompts = [s.caption for s in train[:: max(1, len(train) // cfg.samples)][: cfg.samples]]
    eval_prompts = [s.caption for s in held[: cfg.prompts]]
    second = max(cfg.prompts, cfg.caption_prompts)
    set_b = [s.caption for s in held[second: second + cfg.second_prompts]]  # disjoint from every other set

    # -- probes ------------------------------------------------------------------------------------
    model = pipeline_model(pipe, steps=cfg.steps)
    probe = model.probe_set(probe_prompts, seed=SEED, n_samples=cfg.samples)
    t = time.perf_counter()
    cache = {n: None if args.cache is None else str(args.cache / n) for n in ("pipeline", "unet", "text_encoder")}
    joint_sens = probe_sensitivity(model, probe, cands, n_probes=cfg.probes, seed=SEED, cache=cache["pipeline"])
    joint_probe_s = time.perf_counter() - t
    t = time.perf_counter()
    own = {  # per-component probes: only the rows' splits need them
        "unet": probe_sensitivity(pipe.unet, make_probe_set(pipe.unet, default_probe_inputs(cfg.unet_samples, SEED)),
                                  cands, n_probes=2, seed=SEED, cache=cache["unet"], progress=False),
        "text_encoder": probe_sensitivity(pipe.text_encoder, make_probe_set(pipe.text_encoder, seed=SEED,
                                                                            n_samples=6 * cfg.unet_samples,
                                                                            tokenizer=pipe.tokenizer),
                                          cands, n_probes=4, seed=SEED, cache=cache["text_encoder"], progress=False),
    } if args.budgets else {}
    own_probe_s = time.perf_counter() - t

    dense = {n: Recipe.dense(m, target_layers(m)) for n, m in comps.items()}
    fixed = {n: r.fixed_bytes for n, r in dense.items()}
    numel = {n: sum(int(np.prod(s)) for s in r.shapes.values()) for n, r in dense.items()}
    total_numel = sum(numel.values())
    uniform = {k: PipelineRecipe({n: Recipe.from_specs(m, PaletteSpec(k)) for n, m in comps.items()}) for k in NBITS}
    uniform4 = uniform[4].size_bytes
    budgets = {BUDGETS["u4"]: uniform4, **{BUDGETS[b]: sum(fixed.values()) + int(float(b) * total_numel / 8)
                                           for b in ("3", "2.5")}}

    def joint_recipe(budget: int, refine: int | None = None) -> PipelineRecipe:
        return allocate_pipeline(pipe, budget / 1e9, prompts=probe_prompts, n_samples=cfg.samples, steps=cfg.steps,
                                 sensitivity=joint_sens, candidates=cands, seed=SEED, refine=refine, progress=False)

    t = time.perf_counter()
    joints = {label: joint_recipe(budget) for label, budget in budgets.items()
              if label in args.budgets + args.caption_budgets}
    refine_s = (time.perf_counter() - t) / max(1, len(joints))

    # -- evaluation: image PSNR of the real pipeline, 20 steps, held-out captions ------------------
    ref = pipe(eval_prompts, steps=20, seed=SEED) if args.budgets else None
    ref_b = pipe(set_b, steps=20, seed=SEED) if args.budgets else None
    probe_refs = outputs(model, probe)
    # every candidate palette of every layer, fitted once (all bit-widths of a layer from one pass)
    palettes: dict[tuple, object] = {}
    t = time.perf_counter()
    for name, m in comps.items():
        mods = dict(m.named_modules())
        for chunk in batches(list(dense[name].layers), [mods[n].weight.numel() for n in dense[name].layers]):
            items = [(mods[n].weight, [s for s in cands.spec_list() if applicable(s, tuple(mods[n].weight.shape), n)],
                      None) for n in chunk]
            for n, (_, specs, _), pals in zip(chunk, items, fit_palettes_batch(items, seed=SEED, names=chunk)):
                palettes.update({(name, n, s): p for s, p in zip(specs, pals)})
    fit_s = time.perf_counter() - t

    def fitted(name: str, recipe: Recipe) -> dict:
        return {n: palettes[(name, n, s)] for n, s in recipe.palettized.items()}

    @contextlib.contextmanager
    def applied(pr: PipelineRecipe) -> Iterator[None]:
        """Both components carry `pr`'s palettes (fitted once, above) while the block runs."""
        with palettized(comps["text_encoder"], fitted("text_encoder", pr.components["text_encoder"])), \
                palettized(comps["unet"], fitted("unet", pr.components["unet"])):
            yield

    def images(pr: PipelineRecipe, prompts: list[str]) -> np.ndarray:
        with applied(pr):
            return pipe(prompts, steps=20, seed=SEED)

    def scores(pr: PipelineRecipe) -> tuple[float, float, float]:
        """Image PSNR on set A and on set B (20 steps, uint8), Apple's PSNR on the probe runs (4 steps)."""
        with applied(pr):
            return (image_psnr(pipe(eval_prompts, steps=20, seed=SEED), ref),
                    image_psnr(pipe(set_b, steps=20, seed=SEED), ref_b),
                    Measurement.of(outputs(model, probe), probe_refs, probe.description).psnr)

    rows = []
    additive = []
    bar = tqdm(total=len(args.budgets) * (4 + cfg.fractions), desc="evaluate", leave=False)
    for label in args.budgets:
        budget, joint = budgets[label], joints[label]
        row = {"budget": label, "bytes": budget, "joint": (joint.size_bytes, *scores(joint))}
        bar.update()
        plain = joint_recipe(budget, refine=0)
        row["uncorrected"] = (plain.size_bytes, *scores(plain))
        bar.update()
        b = max(k for k in NBITS if uniform[k].size_bytes <= budget * 1.001)  # LUTs: uniform 3-bit is 0.01% over 3.0 b
        uni = uniform[b]
        row["uniform"] = (uni.size_bytes, image_psnr(images(uni, eval_prompts), ref), b)
        bar.update()
        prop = proportional_fraction(dense)
        pr = split_allocation(own, dense, budget, prop)
        row["proportional"] = (pr.size_bytes, *scores(pr), prop)
        bar.update()
        sweep = []
        for f in feasible_fractions(own, dense, budget, cfg.fractions):
            sr = split_allocation(own, dense, budget, f)
            sweep.append((sr.size_bytes, *scores(sr), float(f)))
            bar.update()
        row["sweep"] = sweep
        row["best"] = max(sweep, key=lambda s: s[1])  # chosen on set A: the oracle
        row["best_b"] = max(sweep, key=lambda s: s[2])  # chosen on set B
        row["by_probe"] = max(sweep, key=lambda s: s[3])  # chosen on the probe runs
        row["refine"] = joint.info["refine"]
        rows.append(row)
        tqdm.write(f"{label}: {row}", file=sys.stderr)  # as it comes, in case the run is cut short
        # additive prediction: sum at 4 steps, measured at 4 steps (the probe runs: what the calibration
        # measures), measured at 20 steps (held-out captions, other seeds)
        held_set = model.with_steps(20).probe_set(eval_prompts[:8], seed=100, n_samples=min(8, len(eval_prompts)))
        refs = outputs(model.with_steps(20), held_set)
        with applied(joint):
            m20 = Measurement.of(outputs(model.with_steps(20), held_set), refs, held_set.description).psnr
        additive.append((label, joint.info["additive_psnr"], row["joint"][3], m20, joint.bits_per_weight,
                         {c: r.bits_per_weight for c, r in joint.components.items()}))
        tqdm.write(f"{label}: additive {additive[-1]}", file=sys.stderr)
    bar.close()
    # caption following of the joint recipes' samples beside 16-bit
    cap_scenes = list(held[: cfg.caption_prompts])
    caps = {}
    if args.caption_budgets:
        caps["16-bit"] = score(pipe([s.caption for s in cap_scenes], steps=20, seed=SEED), cap_scenes)
        tqdm.write(f"caption following, 16-bit: {caps['16-bit']}", file=sys.stderr)
    for label in args.caption_budgets:
        caps[f"joint, {label}"] = score(images(joints[label], [s.caption for s in cap_scenes]), cap_scenes)
        tqdm.write(f"caption following, joint, {label}: {caps[f'joint, {label}']}", file=sys.stderr)

    print(f"default pipeline: MiniLM text encoder ({sum(p.numel() for p in pipe.text_encoder.parameters()):,} "
          f"parameters, {numel['text_encoder']:,} in target layers) + UNet "
          f"({sum(p.numel() for p in pipe.unet.parameters()):,}, {numel['unet']:,}); 16-bit "
          f"{sum(r.size_16bit_bytes for r in dense.values()) / MB:.3f} MB, of which {sum(fixed.values()) / MB:.3f} MB "
          f"not in target layers (embeddings, norms, biases) stays 16-bit")
    print(f"joint probe: {cfg.samples} prompts x {cfg.steps} steps x {cfg.probes} passes, {joint_probe_s:.0f} s; "
          f"per-component probes {own_probe_s:.0f} s; every candidate palette fitted once, {fit_s:.0f} s")
    print(f"image PSNR (dB, uint8) vs the 16-bit pipeline: {len(eval_prompts)} held-out captions, 20 steps, seed {SEED}")
    print(f"{'budget':<20} {'MB':>7} | {'joint':>13} | {'uncorrected':>13} | {'uniform':>20} | {'proportional':>20} | "
          f"{'best swept split':>22} | {'joint-prop':>10} {'joint-best':>10}")
    for r in rows:
        js, jp = r["joint"][:2]
        cs, cp = r["uncorrected"][:2]
        us, up, ub = r["uniform"]
        ps, pp, _, _, pf = r["proportional"]
        bs, bp, _, _, bf = r["best"]
        print(f"{r['budget']:<20} {r['bytes'] / MB:>7.3f} | {jp:>6.2f} {js / r['bytes']:>6.4f} | "
              f"{cp:>6.2f} {cs / r['bytes']:>6.4f} | "
              f"{up:>6.2f} {ub}b {us / r['bytes']:>6.4f} | {pp:>6.2f} f={pf:.2f} {ps / r['bytes']:>6.4f} | "
              f"{bp:>6.2f} f={bf:.2f} {bs / r['bytes']:>6.4f} | {jp - pp:>+10.2f} {jp - bp:>+10.2f}")
    print("(each cell: PSNR on set A, then size / budget; f: the fraction of the room for palettized weights given "
          "to the text encoder)")
    for r in rows:
        print(f"  sweep {r['budget']} (A / B / probe runs): "
              + ", ".join(f"f={f:.2f} {a:.2f}/{b:.2f}/{p:.2f}" for _, a, b, p, f in r["sweep"]))
        print(f"  measured correction {r['budget']}: {r['refine']}")
    print(f"\nselection on the test set: image PSNR on set B ({len(set_b)} other held-out captions, never used to "
          "choose), and Apple's PSNR on the probe runs (4 steps)")
    print(f"  {'budget':<20} | {'joint':>13} | {'uncorrected':>13} | {'proportional':>13} | {'split best on A':>20} | "
          f"{'split best on B':>20} | {'split best on probe':>20}")
    for r in rows:
        cells = [f"{r[k][2]:>6.2f}/{r[k][3]:>6.2f}" for k in ("joint", "uncorrected", "proportional")]
        cells += [f"{r[k][2]:>6.2f}/{r[k][3]:>6.2f} f={r[k][4]:.2f}" for k in ("best", "best_b", "by_probe")]
        print(f"  {r['budget']:<20} | " + " | ".join(cells))
    print(f"(each cell: set B / probe runs; joint measured correction {refine_s:.0f} s per budget, "
          "with its calibration and fitting)")
    n_a, n_b = len(eval_prompts), len(set_b)

    def both(cell: tuple) -> float:
        """Image PSNR over sets A and B together (the mean over their images)."""
        return (n_a * cell[1] + n_b * cell[2]) / (n_a + n_b)

    print(f"\nevery held-out caption of the table (sets A and B, {n_a + n_b}): image PSNR, and the target "
          "(joint >= proportional + 1 dB, >= best swept split - 0.5 dB; the best split chosen on A and B)")
    print(f"  {'budget':<20} | {'joint':>6} | {'proportional':>12} | {'best swept split':>16} | "
          f"{'joint-prop':>10} {'joint-best':>10} | target")
    for r in rows:
        j, pr, best = both(r["joint"]), both(r["proportional"]), max(r["sweep"], key=both)
        met = j >= pr + 1 and j >= both(best) - 0.5
        print(f"  {r['budget']:<20} | {j:>6.2f} | {pr:>12.2f} | {both(best):>6.2f} f={best[4]:.2f} | "
              f"{j - pr:>+10.2f} {j - both(best):>+10.2f} | {'met' if met else 'missed'}")
    print("\nadditive prediction (Apple's PSNR of the float images, dB): predicted additive sum (4 steps) | "
          "measured on the probe runs (4 steps) | measured on 8 held-out captions (20 steps); joint bits per weight")
    for label, add, cal, m20, bits, per in additive:
        print(f"  {label:<20} {add:>7.2f} | {cal:>7.2f} | {m20:>7.2f}   {bits:.2f} b "
              f"(text encoder {per['text_encoder']:.2f}, UNet {per['unet']:.2f})")
    if caps:
        print(f"\ncaption following on {len(cap_scenes)} held-out captions, 20 steps (the checker):")
        keys = list(caps["16-bit"])
        print(f"  {'':<28}" + "".join(f"{k:>13}" for k in keys))
        for name, res in caps.items():
            print(f"  {name:<28}" + "".join(f"{100 * res[k]:>12.1f}%" for k in keys))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
