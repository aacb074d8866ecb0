"""The `palette` command line: analyze, allocate, apply, export, verify, diff, compare, bench, demo.

Every subcommand that reads a model takes `--model`: `default` (the embedded default model's UNet),
`minilm` (all-MiniLM-L6-v2), a local `from_pretrained` directory (with `--subfolder` for a
pipeline's component), a Hugging Face hub id (same, downloaded by diffusers/transformers), or a
`.safetensors` file with `--config config.json`. Bad arguments exit with status 2 and a message
saying what to do; `--json` prints one machine-readable JSON object on stdout instead of text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._checks import check_loaded
from ._jsonio import check_target, replace_dir
from .models.load import MODEL_HELP, PALETTES_FILE, Loaded, load_model
from .models.pipelines import DEFAULT_PIPELINE, is_pipeline
from .palettize import palettize, target_layers
from .probe.inputs import DEFAULT_SAMPLES
from .probe.pipeline_inputs import PIPELINE_SAMPLES
from .probe.run import PASSES_PER_PROBE
from .recipe import APPLE, Candidates
from .spec import GRANULARITIES, NBITS, PaletteSpec

EXIT_USAGE = 2
PLOT_BITS = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)


class UsageError(ValueError):
    """A bad argument: printed as `palette: error: ...`, exit status 2."""


# -- shared pieces -------------------------------------------------------------------------------


def _model(args: argparse.Namespace) -> Loaded:
    t0 = time.perf_counter()
    loaded = load_model(args.model, args.subfolder, args.config)
    check_loaded(loaded.model)
    device = getattr(args, "device", None)
    if device:
        import torch.distributed as dist

        if device == "cuda" and dist.is_initialized():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        try:
            loaded.model.to(torch.device(device))
        except (RuntimeError, AssertionError) as e:
            raise UsageError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    _note(args, f"loaded {loaded.label}: {len(target_layers(loaded.model))} target layers, "
          f"{sum(p.numel() for p in loaded.model.parameters()):,} parameters ({time.perf_counter() - t0:.1f} s)")
    return loaded


def _note(args: argparse.Namespace, text: str) -> None:
    """Progress text: stderr, so that stdout carries only the result (or the JSON)."""
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> int:
    print(json.dumps(result, indent=1, sort_keys=True) if args.json else text)
    return 0


def _whole_pipeline(args: argparse.Namespace) -> bool:
    """Whether `--model` names a whole pipeline to work on: a pipeline folder without `--subfolder`
    (with it, that one component), or `default-pipeline`."""
    if args.model == DEFAULT_PIPELINE and args.subfolder:
        raise UsageError(f"--subfolder applies to a pipeline folder or hub id, not {DEFAULT_PIPELINE}; "
                         "drop it (or use --model default for the default model's UNet)")
    return is_pipeline(args.model) and not args.subfolder


def _candidates(args: argparse.Namespace) -> Candidates:
    """The candidate layers and specs the probe options (or `--apple-json`) ask for."""
    if getattr(args, "apple_json", None):
        bad = [b for b in args.nbits or () if b not in APPLE.nbits]
        if bad or (args.granularity and set(args.granularity) != {"per_tensor"}):
            raise UsageError(
                f"--apple-json allocates what Apple's flow applies: per_tensor, --nbits among "
                f"{' '.join(map(str, APPLE.nbits))}; drop --nbits {' '.join(map(str, bad)) or ''} / --granularity"
            )
        return Candidates(nbits=tuple(args.nbits or APPLE.nbits), granularities=APPLE.granularities,
                          min_numel=APPLE.min_numel, types=APPLE.types)
    return Candidates(nbits=tuple(args.nbits or NBITS), granularities=tuple(args.granularity or GRANULARITIES),
                      group_size=args.group_size)


def _sensitivity(args: argparse.Namespace, loaded: Loaded, probe):
    """Probe the model as the probe options say, or load `--sensitivity`."""
    from .probe import Sensitivity, probe_sensitivity

    importance = getattr(args, "importance", False)
    if getattr(args, "sensitivity", None):
        if importance:
            raise UsageError("--importance needs the probe's gradients: drop --sensitivity and probe here")
        return Sensitivity.load(_existing(args.sensitivity, "--sensitivity"))
    cands = _candidates(args)
    _note(args, f"probing {len(cands.layers(loaded.model))} layers ({args.method}, {args.samples} samples)...")
    return probe_sensitivity(
        loaded.model, probe, cands, method=args.method, seed=args.seed, n_probes=args.probes, cache=args.cache,
        importance=importance, keep_sketch=importance, progress=not args.quiet,
    )


def _probe_set(args: argparse.Namespace, loaded: Loaded, seed: int):
    """The probe set the options ask for, built once for probing, calibrating and measuring."""
    return loaded.probe_set(args.samples, seed, batch_size=getattr(args, "batch_size", None),
                            sample_size=getattr(args, "sample_size", None))


def _output(path: str | os.PathLike, flag: str, *, directory: bool = False) -> Path:
    """An output path checked before any heavy work: not a directory where a file goes (nor a file
    where a directory goes), its folder existing and writable."""
    try:
        return check_target(path, directory=directory)
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from None


def _existing(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such file")
    return p


def _recipe(args: argparse.Namespace, loaded: Loaded):
    """`--recipe`, checked against the model; without it (export, verify) None: the palettes the
    model carries (a folder written by `palette apply`)."""
    from .palettize import palettes_of
    from .recipe import ModelIdentity, Recipe

    if args.recipe is None:
        if not palettes_of(loaded.model):
            raise UsageError(f"{loaded.label} carries no palettes: pass --recipe (or a folder written by `palette apply`)")
        return None
    recipe = Recipe.load(_existing(args.recipe, "--recipe"))
    recipe.check(loaded.model)
    if recipe.model.fingerprint != ModelIdentity.of(loaded.model).fingerprint:
        _note(args, "note: the recipe was computed for other weights of this architecture (a fine-tune?); "
              "it applies, but its predicted PSNR is for those weights")
    return recipe


def _recipe_summary(recipe) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for s in recipe.layers.values():
        key = "16-bit" if s is None else s.label
        counts[key] = counts.get(key, 0) + 1
    return {
        "size_bytes": recipe.size_bytes,
        "size_16bit_bytes": recipe.size_16bit_bytes,
        "bits_per_weight": round(recipe.bits_per_weight, 4),
        "predicted_psnr": recipe.predicted_psnr,
        "layers": len(recipe.layers),
        "specs": dict(sorted(counts.items())),
    }


def _measure(loaded: Loaded, recipe, probe) -> dict[str, float]:
    from .probe import measure

    m = measure(loaded.model, recipe, probe)
    return {"psnr": m.psnr, "mse": m.mse, "cosine": m.cosine}


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.3f} MB"


# -- subcommands ---------------------------------------------------------------------------------


def cmd_analyze(args: argparse.Namespace) -> int:
    """Probe per-layer sensitivity and write it as JSON."""
    _output(args.output, "-o")
    loaded = _model(args)
    sens = _sensitivity(args, loaded, _probe_set(args, loaded, args.seed))
    if _rank() != 0:
        return 0
    out = Path(args.output)
    sens.save(out)
    spec = PaletteSpec(4) if PaletteSpec(4) in sens.specs else sens.specs[0]
    ranked = sorted(sens.layers, key=lambda n: sens.error(n, spec), reverse=True)[: args.top]
    result = {
        "path": str(out),
        "model": loaded.label,
        "method": sens.method,
        "layers": len(sens.layers),
        "specs": [s.label for s in sens.specs],
        "forward_equivalents": sens.cost.forward_equivalents,
        "seconds": round(sens.cost.seconds, 2),
        "most_sensitive": [{"layer": n, "spec": spec.label, "mse": sens.error(n, spec)} for n in ranked],
    }
    lines = [f"{len(sens.layers)} layers x {len(sens.specs)} specs probed ({sens.method}, "
             f"{sens.cost.forward_equivalents:g} forward-equivalents, {sens.cost.seconds:.1f} s)",
             f"most sensitive at {spec.label} (predicted output MSE of that layer alone):"]
    lines += [f"  {n:<60} {sens.error(n, spec):.3e}" for n in ranked]
    lines.append(f"wrote {out}")
    return _emit(args, result, "\n".join(lines))


def cmd_allocate(args: argparse.Namespace) -> int:
    """Choose every layer's spec under the budget; write the recipe and the PSNR-vs-size plot."""
    from .allocate import allocate_bits

    out = _output(args.output, "-o")
    if args.apple_json:
        _output(args.apple_json, "--apple-json")
    if args.plot != "none":
        _output(args.plot or out.with_suffix(".png"), "--plot")
    if _whole_pipeline(args):  # one budget for every component, judged on the images
        from .pipeline_cli import allocate

        return allocate(args, _candidates(args))
    loaded = _model(args)
    probe = _probe_set(args, loaded, args.seed)
    sens = _sensitivity(args, loaded, probe)
    if _rank() != 0:
        return 0
    if sens.seed != args.seed:  # a --sensitivity probed with another seed: calibrate on its probe set
        probe = _probe_set(args, loaded, sens.seed)
    recipe = allocate_bits(loaded.model, args.budget_gb, budget_bits=args.budget_bits, inputs=probe,
                           sensitivity=sens, candidates=_candidates(args), importance=args.importance,
                           seed=args.seed, refine=args.refine, progress=not args.quiet)
    out = Path(args.output)
    recipe.info["command"] = "palette " + shlex.join(args.argv)
    if loaded.hub_id:
        recipe.info["model_id"] = loaded.hub_id
    if args.measure:
        _note(args, "measuring the recipe's real output PSNR...")
        recipe.info["measured"] = {**_measure(loaded, recipe, probe), "samples": args.samples, "seed": args.seed}
    recipe.save(out)
    result = {"path": str(out), "model": loaded.label, **_recipe_summary(recipe)}
    if args.measure:
        result["measured"] = recipe.info["measured"]
    if args.apple_json:
        from ._jsonio import write_atomic

        apple = recipe.to_apple(model_version=args.model_version)
        write_atomic(args.apple_json, json.dumps(apple, indent=1, sort_keys=True) + "\n")
        result.update(apple_json=str(args.apple_json), apple_model_version=apple["model_version"])
    if args.plot != "none":
        plot = Path(args.plot or out.with_suffix(".png"))
        _plot(loaded, plot, sens, probe, args)
        result["plot"] = str(plot)
    lines = [
        f"{loaded.label}: {result['layers']} layers -> {_mb(recipe.size_bytes)} "
        f"(from {_mb(recipe.size_16bit_bytes)} at 16 bits), {recipe.bits_per_weight:.3f} bits per weight",
        "specs: " + ", ".join(f"{k} x{v}" for k, v in result["specs"].items()),
        f"predicted latent PSNR: {recipe.predicted_psnr:.2f} dB" if recipe.predicted_psnr else "nothing palettized",
    ]
    if args.measure:
        lines.append(f"measured latent PSNR: {result['measured']['psnr']:.2f} dB")
    if args.apple_json:
        lines.append(f"wrote {args.apple_json} (Apple's pre-analysis JSON, model_version {result['apple_model_version']})")
    lines.append(f"wrote {out}" + (f" and {result['plot']}" if "plot" in result else ""))
    return _emit(args, result, "\n".join(lines))


def _plot(loaded: Loaded, path: Path, sens, probe, args: argparse.Namespace) -> None:
    """The PSNR-vs-size plot; by default its mixed-bit budgets start half a bit above the
    fewest candidate bits (below that no recipe fits)."""
    from .experiments import psnr_size_curve
    from .plot import plot_psnr_vs_size

    low = min(s.nbits for s in sens.specs) + 0.5
    bits = args.plot_bits or [b for b in PLOT_BITS if b >= low]
    _note(args, f"measuring the PSNR-vs-size curve ({len(bits)} mixed-bit budgets and uniform palettes)...")
    plot_psnr_vs_size(path, psnr_size_curve(loaded.model, sens, probe, bits, seed=args.seed))


def cmd_apply(args: argparse.Namespace) -> int:
    """Palettize the model as the recipe says and save it with from_pretrained-ready weights and
    the palettes it carries beside them."""
    if _whole_pipeline(args):  # a pipeline recipe: every component
        from .pipeline_cli import apply

        return apply(args)
    out = _applied_target(_output(args.output, "-o", directory=True), "-o")
    loaded = _model(args)
    recipe = _recipe(args, loaded)
    result: dict[str, Any] = {"model": loaded.label, **_recipe_summary(recipe)}
    if args.measure:
        result["measured"] = _measure(loaded, recipe, _probe_set(args, loaded, args.seed))
    palettes = palettize(loaded.model, recipe, progress=not args.quiet)
    write_applied(out, loaded.save_pretrained, loaded.model)
    result.update(path=str(out), palettized=len(palettes))
    text = (f"palettized {len(palettes)} of {len(recipe.layers)} layers "
            f"({recipe.bits_per_weight:.3f} bits per weight, {_mb(recipe.size_bytes)} as stored)")
    if args.measure:
        text += f"; measured latent PSNR {result['measured']['psnr']:.2f} dB"
    text += (f"\nwrote {out} (weights equal LUT[indices], dense: load it with from_pretrained; its palettes "
             f"are in {PALETTES_FILE}, which `palette export --model {out}` picks up)")
    return _emit(args, result, text)


def _applied_target(out: Path, flag: str) -> Path:
    """`out` unless it is an existing folder that `palette apply` did not write (nothing in such a
    folder is replaced)."""
    if out.is_dir() and any(out.iterdir()) and not (out / PALETTES_FILE).is_file():
        raise UsageError(f"{flag} {out}: an existing folder that `palette apply` did not write (no {PALETTES_FILE}); "
                         "give a new path (nothing in it is replaced)")
    return out


def write_applied(out: Path, save_pretrained: Callable[[Path], Any], model: torch.nn.Module) -> None:
    """Write a palettized model as `palette apply` does: `save_pretrained` and the palettes `model`
    carries (`PALETTES_FILE`) into a folder beside `out`, moved into place whole (a previous
    `palette apply` folder replaced)."""
    import shutil
    import tempfile

    from .export import export_palettes

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        save_pretrained(tmp)
        export_palettes(model, tmp / PALETTES_FILE)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cmd_export(args: argparse.Namespace) -> int:
    """Write a verified Core ML mlpackage, or the palettes as safetensors."""
    if _whole_pipeline(args):  # one mlpackage per component
        from .pipeline_cli import export

        return export(args, _chunk_bytes(args))
    out = Path(args.output)
    if out.suffix not in (".safetensors", ".mlpackage"):
        raise UsageError(f"-o {out}: the output must end in .mlpackage (Core ML) or .safetensors (palettes)")
    _output(out, "-o", directory=out.suffix == ".mlpackage")
    loaded = _model(args)
    recipe = _recipe(args, loaded)
    result: dict[str, Any] = {"model": loaded.label, "path": str(out),
                              **(_recipe_summary(recipe) if recipe is not None else {})}
    if out.suffix == ".safetensors":
        from .export import export_palettes

        result["file_bytes"] = export_palettes(loaded.model, out, recipe)
        text = f"wrote {out}: {result['file_bytes']:,} bytes of palettes"
        return _emit(args, result, text)
    if out.suffix != ".mlpackage":
        raise UsageError(f"-o {out}: the output must end in .mlpackage (Core ML) or .safetensors (palettes)")
    if not loaded.example:
        raise UsageError(f"{loaded.label}: no example inputs for tracing this model; use export_coreml from Python")
    from .export import export_coreml

    _note(args, "tracing and converting to Core ML (about half a minute for a small UNet)...")
    report = export_coreml(loaded.model, out, loaded.example, recipe=recipe, max_chunk_bytes=_chunk_bytes(args))
    result.update(
        verified=True, palettized=report.n_palettized, kept=report.n_kept,
        stored_palettized_bytes=report.stored_palettized_bytes,
        predicted_palettized_bytes=report.predicted_palettized_bytes,
        weight_file_bytes=report.weight_file_bytes, seconds=report.seconds,
    )
    manifest = getattr(report, "chunks", None)
    if manifest is not None:
        result["chunks"] = [str(p) for p in manifest.chunk_paths()]
    return _emit(args, result, report.summary())


def cmd_verify(args: argparse.Namespace) -> int:
    """Check that an mlpackage or a palettes file holds exactly what the recipe gives the model."""
    path = _existing(args.path, "verify")
    from .palettize import planned_palettes

    loaded = _model(args)
    palettes = planned_palettes(loaded.model, _recipe(args, loaded))
    result: dict[str, Any] = {"path": str(path), "model": loaded.label, "palettized": len(palettes)}
    if path.suffix == ".safetensors":
        from .export import load_palettes

        stored = load_palettes(path)
        problems = _compare_palettes(palettes, stored)
        if problems:
            raise UsageError(f"{path}: verification failed:\n  " + "\n  ".join(problems[:20]))
        result["verified"] = True
        return _emit(args, result, f"{path}: {len(stored)} palettes equal the recipe's, bit for bit")
    if path.suffix != ".mlpackage":
        raise UsageError(f"verify {path}: expected an .mlpackage or a .safetensors palettes file")
    from .export import verify_mlpackage

    kept = {n: m.weight for n, m in target_layers(loaded.model).items() if n not in palettes}
    report = verify_mlpackage(path, palettes, kept)
    result.update(verified=True, kept=report.n_kept, stored_palettized_bytes=report.stored_palettized_bytes,
                  predicted_palettized_bytes=report.predicted_palettized_bytes)
    return _emit(args, result, report.summary())


def _compare_palettes(want: dict, stored: dict) -> list[str]:
    problems = []
    if set(want) != set(stored):
        problems.append(f"layers differ: missing {sorted(set(want) - set(stored))[:5]}, "
                        f"extra {sorted(set(stored) - set(want))[:5]}")
    for n in sorted(set(want) & set(stored)):
        a, b = want[n], stored[n]
        if a.spec != b.spec:
            problems.append(f"{n}: spec {b.spec.label} in the file, {a.spec.label} in the recipe")
        elif not (torch.equal(a.lut, b.lut) and torch.equal(a.indices, b.indices)
                  and (a.scale is None) == (b.scale is None)
                  and (a.scale is None or torch.equal(a.scale, b.scale))):
            problems.append(f"{n}: LUT, indices or scale differ from the recipe's palette")
    return problems


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def cmd_bench(args: argparse.Namespace) -> int:
    """Run benchmarks/bench_<name>.py scripts from the source checkout (all by default)."""
    root = benchmarks_dir()
    available = sorted(p.stem.removeprefix("bench_") for p in root.glob("bench_*.py"))
    if not available:
        raise UsageError(f"no benchmarks in {root}: they ship with the source checkout (git clone), not the wheel")
    if args.list:
        return _emit(args, {"benchmarks": available}, "\n".join(available))
    names = args.names or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UsageError(f"unknown benchmark(s) {unknown}; available: {', '.join(available)}")
    runs = []
    for name in names:
        cmd = [sys.executable, str(root / f"bench_{name}.py"), *args.extra]
        _note(args, "$ " + " ".join(cmd))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root.parent, capture_output=args.json, text=True)
        runs.append({"name": name, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                     **({"stdout": proc.stdout} if args.json else {})})
        if proc.returncode:
            break
    if args.json:
        print(json.dumps({"runs": runs}, indent=1))
    return max(r["returncode"] for r in runs)


def _load_recipe(path: str, what: str):
    """A recipe file the user named, any problem with it a UsageError of one line."""
    from .recipe import Recipe

    try:
        return Recipe.load(_existing(path, what))
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise UsageError(" ".join(str(e).split())) from None


def cmd_diff(args: argparse.Namespace) -> int:
    """Per-layer differences of two recipes; exit 1 when they differ (a CI gate), 0 when equivalent."""
    a, b = _load_recipe(args.a, "recipe"), _load_recipe(args.b, "recipe")
    d = a.diff(b, psnr_tol_db=args.psnr_tol)
    text = f"a: {args.a}\nb: {args.b}\n{d}"
    _emit(args, {"a": args.a, "b": args.b, **d.to_dict()}, text)
    return 1 if d else 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Several recipes on the same probe inputs: measured PSNR, size, PSNR between their outputs."""
    from .compare import compare_recipes

    if len(set(args.recipes)) < len(args.recipes):
        raise UsageError("a recipe is named twice: name each one once")
    names = [Path(p).name for p in args.recipes]
    labels = names if len(set(names)) == len(names) else args.recipes  # file names where they tell them apart
    recipes = {label: _load_recipe(path, "recipe") for label, path in zip(labels, args.recipes)}
    for c, flag in ((args.plot, "--plot"), (args.grid, "--grid")):
        if c is not None and Path(c).suffix.lower() != ".png":
            raise UsageError(f"{flag} {c}: expected a .png path")
    loaded = _model(args)
    if args.grid and loaded.pipeline is None:
        raise UsageError(f"--grid samples images with the model's pipeline; {loaded.label} has none here "
                         "(the default model has one)")
    for path, recipe in recipes.items():
        try:
            recipe.check(loaded.model)
        except ValueError as e:
            raise UsageError(f"{path}: " + " ".join(str(e).split())) from None
    _note(args, f"running {len(recipes)} recipe(s) on {args.samples} probe samples...")
    result = compare_recipes(loaded.model, recipes, _probe_set(args, loaded, args.seed), seed=args.seed)
    out = result.to_dict()
    text = str(result)
    if args.plot:
        out["plot"] = str(result.plot(args.plot))
        text += f"\nplot: {args.plot}"
    if args.grid:
        from .models.data import held_out_captions

        _note(args, f"sampling {args.prompts} prompts with {len(recipes) + 1} variants...")
        scores = result.sample_grid(args.grid, loaded.model, loaded.pipeline, held_out_captions(args.prompts),
                                    steps=args.steps, seed=args.seed)
        out["grid"], out["image_psnr"] = args.grid, scores
        text += f"\ngrid: {args.grid} (image PSNR: " + ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()) + ")"
    return _emit(args, out, text)


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the default model (see palette/demo.py)."""
    from .demo import run_demo

    return run_demo(args)


# -- parser --------------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows a default only where there is one worth reading (not None, False or a list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            text += f" (default: {shown})"
        return text


def _common(model: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    if model:
        g = p.add_argument_group("model")
        g.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
        g.add_argument("--subfolder", metavar="NAME",
                       help="component of a pipeline: unet or transformer, text_encoder, text_encoder_2 or vae")
        g.add_argument("--config", metavar="JSON",
                       help="config.json for a .safetensors --model (default: the one next to it)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    return p


def _probe_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("probing")
    g.add_argument("--method", choices=("fast", "exhaustive"), default="fast",
                   help="fast: 1 forward + --probes backward passes; exhaustive: one forward per layer and spec")
    g.add_argument("--nbits", type=int, nargs="+", choices=NBITS, metavar="N",
                   help=f"candidate bit-widths, among {' '.join(map(str, NBITS))} (default: all)")
    g.add_argument("--granularity", nargs="+", choices=GRANULARITIES, metavar="G",
                   help="candidate LUT granularities: per_tensor, per_grouped_channel (default: both)")
    g.add_argument("--group-size", type=_positive, default=16, metavar="N",
                   help="output channels per LUT (per_grouped_channel)")
    g.add_argument("--samples", type=_positive, metavar="N",
                   help=f"probe samples (data-free, synthesised; default {DEFAULT_SAMPLES}, for a whole pipeline "
                        f"{PIPELINE_SAMPLES} prompts)")
    g.add_argument("--probes", type=_positive, metavar="K",
                   help="random projections, backward passes per sample (fast method; default: "
                        f"{PASSES_PER_PROBE} over all samples, at least 2 each)")
    g.add_argument("--batch-size", type=_positive, metavar="N",
                   help="probe samples per forward pass (default: 4 for small latents, else 1)")
    g.add_argument("--sample-size", type=_positive, metavar="N",
                   help="latent size of synthesised denoiser inputs (default: the model's config)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the probe inputs and of vector k-means")
    g.add_argument("--cache", metavar="DIR", help="directory to resume an interrupted probe from")
    g.add_argument("--device", metavar="DEVICE",
                   help="cpu, cuda, cuda:N or mps: the model and the probe run there (default: cpu; under "
                   "torchrun with cuda, each rank its own GPU)")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


EPILOG = """\
examples:
  palette demo                                     # the main job on the default model, into out/
  palette analyze --model minilm -o sens.json
  palette allocate --model minilm --budget-bits 3 --sensitivity sens.json -o recipe.json
  palette export --model minilm --recipe recipe.json -o minilm.mlpackage
  palette verify minilm.mlpackage --model minilm --recipe recipe.json
  palette allocate --model path/to/sd15 --subfolder unet --budget-gb 0.75 -o unet.json
  palette diff golden.json recipe.json             # exit 1 when they differ: a CI gate
  palette compare --model default a.json b.json --plot cmp.png

exit status: 0 success, 1 failure (a benchmark failed, `diff` found differences), 2 bad arguments or inputs
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palette", formatter_class=_Formatter, epilog=EPILOG,
        description="Mixed-bit k-means palettization of diffusion models for Core ML: probe each "
        "layer's sensitivity, choose bits per layer under a size budget, export a verified mlpackage.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"palette {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, probe = _common(), _probe_options()

    def add(name: str, func: Callable, help: str,
            parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                           parents=list(parents), formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    p = add("analyze", cmd_analyze, "probe how much each layer's palettization costs in output PSNR",
            [common, probe])
    p.add_argument("-o", "--output", default="sensitivity.json", metavar="PATH",
                   help="sensitivity JSON to write")
    p.add_argument("--top", type=int, default=10, metavar="N", help="most sensitive layers to list")

    p = add("allocate", cmd_allocate, "choose bits per layer under a size budget; write a recipe and a plot",
            [common, probe])
    budget = p.add_argument_group("budget (one of)").add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-gb", type=_positive_float, metavar="GB", help="whole model as stored, decimal GB")
    budget.add_argument("--budget-bits", type=_positive_float, metavar="BITS", help="average bits per target weight")
    p.add_argument("--sensitivity", metavar="JSON",
                   help="reuse a sensitivity JSON from `palette analyze` instead of probing")
    p.add_argument("-o", "--output", default="recipe.json", metavar="PATH", help="recipe JSON to write")
    p.add_argument("--plot", metavar="PNG",
                   help="PSNR-vs-size PNG (default: the recipe path with .png; 'none' to skip)")
    p.add_argument("--plot-bits", type=_positive_float, nargs="+", metavar="BITS",
                   help="budgets of the plot's mixed-bit curve, bits per weight (default: 2 to 6, "
                   "from half a bit above the fewest candidate bits)")
    p.add_argument("--importance", action="store_true",
                   help="also try Fisher-weighted k-means per layer, kept where predicted better (fast method)")
    p.add_argument("--refine", type=_count, default=None, metavar="N",
                   help="rounds of the measured correction for interacting layers: each top-level module's "
                   "(component's) errors rescaled by what the recipe measures, knapsack again, the best measured "
                   "recipe kept (default: 2 for a pipeline, 0 for one model)")
    p.add_argument("--measure", action="store_true",
                   help="also measure the recipe's real output PSNR (recorded in the recipe's info)")
    p.add_argument("--apple-json", metavar="PATH",
                   help="allocate only what Apple's ml-stable-diffusion flow applies in full (Linear/Conv2d "
                   "above 1e5 weights, per-tensor 1/2/4/6/8 bits) and also write the recipe as its "
                   "pre-analysis JSON for mixed_bit_compression_apply.py")
    p.add_argument("--model-version", metavar="HUB_ID",
                   help="the model_version of --apple-json: the hub id Apple's scripts load (default: "
                   "--model when it is a hub id)")

    recipe_opts = argparse.ArgumentParser(add_help=False)
    recipe_opts.add_argument("--recipe", required=True, metavar="JSON", help="recipe JSON from `palette allocate`")
    carried_opts = argparse.ArgumentParser(add_help=False)
    carried_opts.add_argument("--recipe", metavar="JSON",
                              help="recipe JSON from `palette allocate` (default: the palettes the model carries, "
                              "e.g. a folder written by `palette apply`)")

    p = add("apply", cmd_apply, "palettize a model as a recipe says and save it (from_pretrained format)",
            [common, recipe_opts])
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="directory to write (save_pretrained)")
    p.add_argument("--measure", action="store_true", help="also measure the real output PSNR")
    p.add_argument("--samples", type=_positive, default=8, metavar="N", help="probe samples for --measure")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the probe inputs for --measure")

    p = add("export", cmd_export, "export a verified Core ML mlpackage or the palettes as safetensors",
            [common, carried_opts])
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="NAME.mlpackage (Core ML) or NAME.safetensors (palettes)")
    chunk = p.add_mutually_exclusive_group()
    chunk.add_argument("--max-chunk-mb", type=_positive_float, metavar="MB",
                       help="also split the mlpackage into chunks of at most MB decimal megabytes of weights "
                       "each (iOS maps each model file under a limit, ~1000 MB), written with a "
                       "manifest.json to NAME_chunks/")
    chunk.add_argument("--max-chunk-bytes", type=_positive, metavar="N", help="the same limit in bytes")

    p = add("verify", cmd_verify, "check an mlpackage or palettes file bit for bit against a recipe and model",
            [common, carried_opts])
    p.add_argument("path", help="the .mlpackage or .safetensors to check")

    p = add("bench", cmd_bench, "run the benchmarks in benchmarks/ (source checkout)", [_common(model=False)])
    p.add_argument("names", nargs="*", help="benchmarks to run (bench_<name>.py); all by default")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="arguments after -- go to every script")

    p = add("diff", cmd_diff, "compare two recipes layer by layer; exit 1 when they differ, 0 when equivalent",
            [_common(model=False)])
    p.add_argument("a", metavar="A.json", help="the reference recipe (e.g. the golden one)")
    p.add_argument("b", metavar="B.json", help="the recipe to compare with it")
    p.add_argument("--psnr-tol", type=_non_negative_float, metavar="DB",
                   help="also count predicted PSNRs further apart than DB dB as a difference "
                   "(default: predicted PSNR is reported, not compared)")

    p = add("compare", cmd_compare, "run several recipes on the same probe inputs and compare their outputs",
            [common])
    p.add_argument("recipes", nargs="+", metavar="RECIPE.json", help="recipe JSON files (from `palette allocate`)")
    p.add_argument("--samples", type=_positive, default=8, metavar="N",
                   help="probe samples (data-free, synthesised; the default model's demo uses 2)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the probe inputs and of the samples")
    p.add_argument("--plot", metavar="PNG", help="also write measured PSNR against size, every recipe labelled")
    p.add_argument("--grid", metavar="PNG",
                   help="also sample the same prompts and seed at 16 bits and with every recipe (the default model)")
    p.add_argument("--prompts", type=_positive, default=6, metavar="N", help="held-out captions to sample for --grid")
    p.add_argument("--steps", type=_positive, default=20, metavar="N", help="sampling steps for --grid")

    p = add("demo", cmd_demo, "the main job on the default model: probe, allocate, export, sample, plot",
            [_common(model=False)])
    p.add_argument("--out", default="out", metavar="DIR", help="directory for the recipes, mlpackage and PNGs")
    p.add_argument("--fast", action="store_true", help="a smoke run: per-tensor candidates, smaller probe, fewer prompts and steps")
    p.add_argument("--no-export", action="store_true", help="skip the Core ML export (about half a minute)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of probe inputs and samples")
    p.add_argument("--pipeline", action="store_true",
                   help="the whole pipeline (MiniLM + UNet) in one budget: joint vs per-component allocation")
    return parser


def _chunk_bytes(args: argparse.Namespace) -> int | None:
    """The export's per-chunk weight limit in bytes, from --max-chunk-mb or --max-chunk-bytes."""
    if args.max_chunk_mb is not None:
        return int(args.max_chunk_mb * 1e6)
    return args.max_chunk_bytes


SHARDED = ("analyze", "allocate")  # the commands torchrun shards across processes


def _rank() -> int:
    """This process's rank under torchrun (0 without it): only rank 0 writes and prints."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _join_torchrun(args: argparse.Namespace) -> bool:
    """Under torchrun (WORLD_SIZE > 1): join its process group, gloo on the CPU, nccl with CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if args.command not in SHARDED:
        raise UsageError(f"torchrun shards {' and '.join(SHARDED)} only; run `palette {args.command}` in one process")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if (getattr(args, "device", None) or "").startswith("cuda") else "gloo")
    if dist.get_rank() != 0:
        args.quiet = True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "extra", None) and args.extra[0] == "--":
        args.extra = args.extra[1:]
    joined = False
    try:
        joined = _join_torchrun(args)
        if getattr(args, "samples", 0) is None:
            args.samples = PIPELINE_SAMPLES if _whole_pipeline(args) else DEFAULT_SAMPLES
        return args.func(args)
    except (ValueError, ImportError) as e:  # bad arguments or input files (LoadError included)
        print(f"palette: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a path that cannot be read or written
        where = f"{e.filename}: " if e.filename else ""
        print(f"palette: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("palette: interrupted", file=sys.stderr)
        return 130
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
