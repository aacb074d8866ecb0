"""`palette allocate | apply | export` on a whole pipeline (`--model default-pipeline` or a diffusers
pipeline folder): one budget for every component, a pipeline recipe file, and per component the
palettized weights or a verified Core ML mlpackage (chunked with --max-chunk-mb)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from .cli import UsageError, _emit, _note
from .models.pipelines import load_pipeline
from .pipeline import PipelineRecipe, allocate_pipeline, pipeline_model
from .probe.pipeline_inputs import PROBE_STEPS

MB = 1e6


def _summary(rec: PipelineRecipe) -> dict[str, Any]:
    return {"size_bytes": rec.size_bytes, "size_16bit_bytes": rec.size_16bit_bytes,
            "bits_per_weight": round(rec.bits_per_weight, 4), "predicted_psnr": rec.predicted_psnr,
            "components": {n: {"size_bytes": r.size_bytes, "bits_per_weight": round(r.bits_per_weight, 4),
                               "palettized": len(r.palettized), "layers": len(r.layers)}
                           for n, r in rec.components.items()}}


def _lines(label: str, rec: PipelineRecipe) -> list[str]:
    out = [f"{label}: {rec.size_bytes / MB:.3f} MB as stored (from {rec.size_16bit_bytes / MB:.3f} MB at 16 bits), "
           f"{rec.bits_per_weight:.3f} bits per weight"]
    for n, r in rec.components.items():
        out.append(f"  {n:<13} {r.size_bytes / MB:>9.3f} MB  {r.bits_per_weight:.3f} b/w  "
                   f"{len(r.palettized)} of {len(r.layers)} layers palettized")
    return out


def allocate(args: argparse.Namespace, candidates: Any) -> int:
    pipe, label, prompts = load_pipeline(args.model)
    if args.sensitivity:
        raise ValueError("--sensitivity applies to one model; a pipeline is probed here, on its images")
    samples = args.samples
    _note(args, f"probing {label} on its images ({samples} prompts, {PROBE_STEPS} sampler steps)...")
    rec = allocate_pipeline(pipe, args.budget_gb, budget_bits=args.budget_bits, prompts=prompts or None,
                            n_samples=samples, candidates=candidates, method=args.method, n_probes=args.probes,
                            seed=args.seed, refine=args.refine, cache=args.cache, progress=not args.quiet)
    rec.info["command"] = "palette " + shlex.join(args.argv)
    out = Path(args.output)
    rec.save(out)
    lines = _lines(label, rec)
    lines.append(f"predicted image PSNR: {rec.predicted_psnr:.2f} dB (measured on the probe runs)"
                 if rec.predicted_psnr is not None else "nothing palettized")
    lines.append(f"wrote {out} (a pipeline recipe: one recipe per component)")
    return _emit(args, {"path": str(out), "model": label, **_summary(rec)}, "\n".join(lines))


def _load(args: argparse.Namespace) -> tuple[Any, str, PipelineRecipe, dict]:
    if args.recipe is None:
        raise ValueError("a pipeline needs --recipe (a pipeline recipe from `palette allocate`)")
    path = Path(args.recipe)
    if not path.exists():
        raise ValueError(f"--recipe {args.recipe}: no such file")
    rec = PipelineRecipe.load(path)
    pipe, label, _ = load_pipeline(args.model)
    return pipe, label, rec, pipeline_model(pipe).components


def apply(args: argparse.Namespace) -> int:
    """Palettize every component and save each as `<output>/<component>/` (save_pretrained) with
    its palettes beside it, as `palette apply` saves one model."""
    from .cli import _applied_target, _output, write_applied

    if args.measure:
        raise UsageError("--measure applies to one model; a pipeline recipe's predicted_psnr is already measured "
                         "on its images")
    out = _output(args.output, "-o", directory=True)
    pipe, label, rec, comps = _load(args)
    owners = {}
    for name in rec.components:
        owner = getattr(pipe, "vae", None) if name == "vae_decoder" else comps[name]
        if not hasattr(owner, "save_pretrained"):
            raise UsageError(f"{name}: {type(owner).__name__} has no save_pretrained; use `palette export`")
        owners[name] = owner
        _applied_target(out / name, "-o")
    rec.apply(pipe, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, owner in owners.items():
        write_applied(out / name, owner.save_pretrained, comps[name])
        written[name] = str(out / name)
    text = "\n".join(_lines(label, rec) + [f"wrote {out}: " + ", ".join(written) + " (each loads with "
                                           "from_pretrained; `palette export --model <folder>` picks up its palettes)"])
    return _emit(args, {"model": label, "paths": written, **_summary(rec)}, text)


def export(args: argparse.Namespace, max_chunk_bytes: int | None) -> int:
    """One verified mlpackage per component, `<output>/<component>.mlpackage`; with a chunk limit
    also `<output>/<component>_chunks/` (each component split on its own, every limit checked
    before anything is converted)."""
    from .chunking import chunks_needed, layer_bytes_in_order
    from .export import export_coreml

    out = Path(args.output)
    if out.suffix:
        raise UsageError(f"-o {out}: a pipeline exports to a directory (one .mlpackage per component)")
    pipe, label, rec, comps = _load(args)
    example = pipeline_model(pipe).example_inputs()
    predicted = {}
    if max_chunk_bytes is not None:
        for name, recipe in rec.components.items():
            try:
                predicted[name] = chunks_needed(layer_bytes_in_order(comps[name], recipe, example[name]),
                                                max_chunk_bytes)
            except ValueError as e:
                raise UsageError(f"{name}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    reports, lines = {}, _lines(label, rec)
    for name, recipe in rec.components.items():
        _note(args, f"{name}: tracing and converting to Core ML...")
        path = out / f"{name}.mlpackage"
        report = export_coreml(comps[name], path, example[name], recipe=recipe, max_chunk_bytes=max_chunk_bytes)
        reports[name] = {"path": str(path), "palettized": report.n_palettized, "kept": report.n_kept,
                         "stored_palettized_bytes": report.stored_palettized_bytes,
                         "predicted_palettized_bytes": report.predicted_palettized_bytes,
                         "weight_file_bytes": report.weight_file_bytes, "verified": True}
        lines.append(f"  {name}: {report.summary()}")
        manifest = getattr(report, "chunks", None)
        if manifest is not None:
            reports[name]["chunks"] = {"paths": [str(p) for p in manifest.chunk_paths()],
                                       "weight_bytes": [c.weight_bytes for c in manifest.chunks],
                                       "total_weight_bytes": manifest.total_weight_bytes,
                                       "predicted_count": predicted[name], "verified": True}
            lines.append(f"    predicted {predicted[name]} chunk(s) (chunks_needed), verified read-back")
    return _emit(args, {"model": label, "exports": reports, **_summary(rec)}, "\n".join(lines))
