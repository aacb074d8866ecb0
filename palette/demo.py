"""`palette demo`: the main job, end to end, on the embedded default model.

Probe every layer's sensitivity, allocate bits at two budgets (the size of uniform 4-bit, and 3 bits
per weight), measure each recipe's real output PSNR, export one verified Core ML mlpackage, sample
the same prompts with the same seeds at 16 bits, uniform 4-bit and palette's mixed bits, and plot
PSNR against size. Writes into `--out` (default `out/`) and prints a summary table and the paths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .metrics import image_psnr
from .palettize import target_layers
from .plot import row_label, write_grid
from .probe.pipeline_inputs import PIPELINE_SAMPLES
from .recipe import Candidates, Recipe
from .spec import PaletteSpec

LOW_BITS = 3.0  # the second budget, in bits per weight


@dataclass(frozen=True)
class Settings:
    samples: int  # probe samples per timestep (default_probe_inputs: 6 timesteps each)
    probes: int
    prompts: int
    steps: int
    plot_bits: tuple[float, ...]  # budgets of the plot's mixed-bit curve
    granularities: tuple[str, ...]
    pipeline_samples: int  # `--pipeline`: probe prompts of the joint probe (each component's own: as many)


FULL = Settings(samples=2, probes=8, prompts=6, steps=20, plot_bits=(2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0),
                granularities=("per_tensor", "per_grouped_channel"), pipeline_samples=PIPELINE_SAMPLES)
FAST = Settings(samples=1, probes=2, prompts=3, steps=6, plot_bits=(3.0, 4.0), granularities=("per_tensor",),
                pipeline_samples=2)


@dataclass
class Variant:
    name: str
    recipe: Recipe | None  # None: the 16-bit model
    size_bytes: int
    bits_per_weight: float
    predicted_psnr: float | None = None
    measured_psnr: float | None = None
    image_psnr: float | None = None
    recipe_path: str | None = None


def run_demo(args: argparse.Namespace) -> int:
    from .allocate import allocate_bits
    from .compare import sample_images
    from .models.data import held_out_captions
    from .models.load import load_model
    from .probe import measure, probe_sensitivity

    if getattr(args, "pipeline", False):
        return run_pipeline_demo(args)
    t_start = time.perf_counter()
    cfg = FAST if args.fast else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = ["load", "probe", "allocate", "measure", "sample", "plot"] + ([] if args.no_export else ["export"])
    bar = tqdm(stages, desc="demo", disable=args.quiet, file=sys.stderr, leave=False)
    seconds: dict[str, float] = {}

    def stage(name: str) -> None:
        seconds[name] = time.perf_counter()
        bar.set_description(f"demo: {name}")

    def done(name: str) -> None:
        seconds[name] = round(time.perf_counter() - seconds[name], 1)
        bar.update()

    stage("load")
    loaded = load_model("default")
    unet, pipe = loaded.model, loaded.pipeline
    probe = loaded.probe_set(cfg.samples, args.seed)
    done("load")

    stage("probe")
    sens = probe_sensitivity(unet, probe, Candidates(granularities=cfg.granularities),
                             n_probes=cfg.probes, seed=args.seed, progress=not args.quiet)
    sens.save(out / "sensitivity.json")
    done("probe")

    stage("allocate")
    uniform = Recipe.from_specs(unet, PaletteSpec(4), seed=args.seed)
    recipes = {
        "palette mixed, same size": allocate_bits(unet, budget_gb=uniform.size_bytes / 1e9, sensitivity=sens,
                                                  seed=args.seed, progress=False),
        f"palette mixed, {LOW_BITS:g} bits": allocate_bits(unet, budget_bits=LOW_BITS, sensitivity=sens,
                                                          seed=args.seed, progress=False),
    }
    variants = [Variant("16-bit", None, uniform.size_16bit_bytes, 16.0),
                Variant("uniform 4-bit", uniform, uniform.size_bytes,
                        uniform.bits_per_weight, sens.predict_psnr(uniform.palettized))]
    for (name, recipe), file in zip(recipes.items(), ("recipe_same_size.json", f"recipe_{LOW_BITS:g}bit.json")):
        recipe.save(out / file)
        variants.append(Variant(name, recipe, recipe.size_bytes, recipe.bits_per_weight,
                                recipe.predicted_psnr, recipe_path=str(out / file)))
    done("allocate")

    stage("measure")
    for v in variants[1:]:
        v.measured_psnr = measure(unet, v.recipe, probe).psnr
    done("measure")

    stage("sample")
    prompts = held_out_captions(cfg.prompts)
    images = sample_images(unet, pipe, [v.recipe for v in variants], prompts, steps=cfg.steps, seed=args.seed)
    for v, imgs in zip(variants[1:], images[1:]):
        v.image_psnr = image_psnr(imgs, images[0])
    grid = out / "demo_grid.png"
    write_demo_grid(grid, variants, images, prompts, cfg.steps, args.seed)
    done("sample")

    stage("plot")
    from .experiments import psnr_size_curve
    from .plot import plot_psnr_vs_size

    plot = out / "demo_psnr_vs_size.png"
    plot_psnr_vs_size(plot, psnr_size_curve(unet, sens, probe, cfg.plot_bits, seed=args.seed))
    done("plot")

    files = {"sensitivity": str(out / "sensitivity.json"), "grid": str(grid), "plot": str(plot),
             **{f"recipe: {v.name}": v.recipe_path for v in variants if v.recipe_path}}
    export: dict[str, Any] = {}
    if not args.no_export:
        from .export import export_coreml

        stage("export")
        mixed = variants[2]
        path = out / "default_unet_mixed.mlpackage"
        report = export_coreml(unet, path, loaded.example, recipe=mixed.recipe)
        export = {"path": str(path), "palettized": report.n_palettized, "kept": report.n_kept,
                  "stored_palettized_bytes": report.stored_palettized_bytes,
                  "predicted_palettized_bytes": report.predicted_palettized_bytes, "verified": True}
        files["mlpackage"] = str(path)
        done("export")
    bar.close()
    total = round(time.perf_counter() - t_start, 1)
    summary = {
        "model": loaded.label, "layers": len(target_layers(unet)), "probe": sens.inputs_description,
        "variants": [{k: v for k, v in vars(x).items() if k != "recipe"} for x in variants],
        "export": export, "files": files, "seconds": {**seconds, "total": total},
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(table(variants, loaded.label, len(target_layers(unet))))
        if export:
            print(f"\nCore ML: {export['path']} verified bit-exact ({export['palettized']} palettized layers, "
                  f"{export['kept']} kept at fp16; palettized weights {export['stored_palettized_bytes']:,} B "
                  f"stored = {export['predicted_palettized_bytes']:,} B predicted)")
        print("\nfiles:")
        for k, v in files.items():
            print(f"  {k:<34} {v}")
        print(f"\ndone in {total:.0f} s (" + ", ".join(f"{k} {v:g} s" for k, v in seconds.items()) + ")")
    return 0


def table(variants: list[Variant], label: str, layers: int) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    rows = [f"{label}, {layers} target layers; PSNR in dB against the 16-bit model",
            f"{'variant':<28} {'bits/w':>6} {'size MB':>8} {'predicted':>9} {'measured':>9} {'images':>7}"]
    for v in variants:
        rows.append(f"{v.name:<28} {v.bits_per_weight:>6.2f} {v.size_bytes / 1e6:>8.3f} "
                    f"{f(v.predicted_psnr):>9} {f(v.measured_psnr):>9} {f(v.image_psnr):>7}")
    rows.append("predicted: additive latent PSNR from the probe; measured: latent PSNR on the probe inputs; "
                "images: pixel PSNR of the samples (same seeds)")
    return "\n".join(rows)


def write_demo_grid(path: Path, variants: list[Variant], images: list[np.ndarray], prompts: list[str],
                    steps: int, seed: int) -> None:
    """Rows: variants (with size and PSNR); columns: prompts (captions on top); same seeds."""
    rows = [(row_label(v.name, v.size_bytes, v.bits_per_weight, v.measured_psnr), imgs)
            for v, imgs in zip(variants, images)]
    write_grid(path, rows, prompts, f"palette default model: same prompts, seed {seed}, {steps} DPM-Solver++ steps")


def run_pipeline_demo(args: argparse.Namespace) -> int:
    """The default pipeline (MiniLM + UNet) fitted into one budget: the joint recipe (every layer of
    both components in one knapsack, judged on the image) against per-component allocation with the
    room split in proportion to the components' weights, at 2-3 budgets; samples, image PSNR, and the
    PSNR-vs-size plot. Writes the pipeline recipes, `pipeline_grid.png`, `pipeline_psnr_vs_size.png`."""
    from .experiments import proportional_fraction, split_allocation
    from .models.data import split_scenes
    from .models.default import default_probe_inputs
    from .models.pipelines import DEFAULT_PIPELINE, load_pipeline
    from .pipeline import allocate_pipeline, pipeline_model
    from .plot import plot_series
    from .probe import make_probe_set, probe_sensitivity

    t_start = time.perf_counter()
    cfg = FAST if args.fast else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe, label, probe_prompts = load_pipeline(DEFAULT_PIPELINE)
    comps = {"text_encoder": pipe.text_encoder, "unet": pipe.unet}
    cands = Candidates(granularities=cfg.granularities)
    quiet = args.quiet
    n_prompts = cfg.pipeline_samples
    joint_sens = probe_sensitivity(pipeline_model(pipe), pipeline_model(pipe).probe_set(
        probe_prompts, seed=args.seed, n_samples=n_prompts), cands, n_probes=2, seed=args.seed, progress=not quiet)
    scenes = -(-n_prompts // 6)  # the UNet's own probe: 6 timesteps per scene, about as many samples
    own = {"unet": probe_sensitivity(pipe.unet, make_probe_set(pipe.unet, default_probe_inputs(scenes, args.seed)),
                                     cands, n_probes=2, seed=args.seed, progress=not quiet),
           "text_encoder": probe_sensitivity(pipe.text_encoder, make_probe_set(pipe.text_encoder, seed=args.seed,
                                                                               n_samples=6 * scenes,
                                                                               tokenizer=pipe.tokenizer),
                                             cands, n_probes=2, seed=args.seed, progress=not quiet)}
    dense = {n: Recipe.dense(m, target_layers(m)) for n, m in comps.items()}
    numel = sum(sum(int(np.prod(s)) for s in r.shapes.values()) for r in dense.values())
    fixed = sum(r.fixed_bytes for r in dense.values())
    uniform4 = sum(Recipe.from_specs(m, PaletteSpec(4), seed=args.seed).size_bytes for m in comps.values())
    budgets = {f"{b:g} bits": fixed + int(b * numel / 8) for b in cfg.plot_bits if b < 4}
    budgets["uniform 4-bit size"] = uniform4
    prompts = [s.caption for s in split_scenes()[1][: cfg.prompts]]
    ref = pipe(prompts, steps=cfg.steps, seed=args.seed)
    variants = [Variant("16-bit", None, sum(r.size_16bit_bytes for r in dense.values()), 16.0)]
    images = [ref]
    series: dict[str, list[tuple[int, float]]] = {"joint (one knapsack, image error)": [],
                                                  "per component, proportional split": []}
    files = {}
    for name, budget in tqdm(budgets.items(), desc="budgets", disable=quiet, leave=False):
        joint = allocate_pipeline(pipe, budget / 1e9, prompts=probe_prompts, n_samples=n_prompts,
                                  sensitivity=joint_sens, candidates=cands, seed=args.seed, progress=False)
        per = split_allocation(own, dense, budget, proportional_fraction(dense))
        path = out / f"pipeline_recipe_{name.split()[0]}.json"
        joint.save(path)
        files[f"pipeline recipe, {name}"] = str(path)
        for kind, rec, key in (("joint", joint, "joint (one knapsack, image error)"),
                               ("per component", per, "per component, proportional split")):
            with rec.applied(pipe):
                imgs = pipe(prompts, steps=cfg.steps, seed=args.seed)
            v = Variant(f"{kind}, {name}", None, rec.size_bytes, rec.bits_per_weight,
                        rec.predicted_psnr if kind == "joint" else None, image_psnr=image_psnr(imgs, ref))
            variants.append(v)
            images.append(imgs)
            series[key].append((rec.size_bytes, v.image_psnr))
    grid, plot = out / "pipeline_grid.png", out / "pipeline_psnr_vs_size.png"
    write_demo_grid(grid, variants, images, prompts, cfg.steps, args.seed)
    plot_series(plot, series, f"{label}: one budget, joint vs per-component")
    files.update(grid=str(grid), plot=str(plot))
    summary = {"model": label, "variants": [{k: v for k, v in vars(x).items() if k != "recipe"} for x in variants],
               "files": files, "seconds": round(time.perf_counter() - t_start, 1)}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(table(variants, label, len(target_layers(pipeline_model(pipe)))).replace(
            "predicted: additive latent PSNR from the probe; measured: latent PSNR on the probe inputs",
            "predicted: the joint recipe's image PSNR on the probe runs (4 steps)"))
        print("\nfiles:\n" + "\n".join(f"  {k:<34} {v}" for k, v in files.items()))
        print(f"\ndone in {summary['seconds']:.0f} s")
    return 0


__all__ = ["run_demo", "run_pipeline_demo"]
