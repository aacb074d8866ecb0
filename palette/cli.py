"""The `palette` command line: analyze, allocate, apply, export, verify, bench, demo.

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
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .palettize import apply_palettes, target_layers
from .spec import GRANULARITIES, NBITS, PaletteSpec

EXIT_USAGE = 2
PLOT_BITS = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_HELP = (
    "'default' (the embedded default UNet), 'minilm' (all-MiniLM-L6-v2), a local from_pretrained "
    "directory, a Hugging Face hub id (e.g. stabilityai/stable-diffusion-2-1-base with --subfolder "
    "unet), or a .safetensors file (with --config)"
)


class UsageError(ValueError):
    """A bad argument: printed as `palette: error: ...`, exit status 2."""


# -- models ------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model the CLI works on, with what probing, export and saving need to know about it."""

    model: nn.Module
    label: str
    kind: str  # "unet", "text", "vae" or "module"
    example: tuple[torch.Tensor, ...] = ()  # example inputs for Core ML export (batch of 1)
    probe_extra: dict[str, Any] = field(default_factory=dict)  # text_encoder / tokenizer / scheduler
    make_inputs: Callable[[int, int], Any] | None = None  # (samples, seed) -> probe inputs
    owner: nn.Module | None = None  # what save_pretrained writes (the whole VAE for its decoder)

    def probe_kwargs(self, samples: int, seed: int) -> dict[str, Any]:
        """Keyword arguments for probe_sensitivity / measure: the same probe set for both."""
        if self.make_inputs is not None:
            return {"inputs": self.make_inputs(samples, seed)}
        return {"n_samples": samples, **self.probe_extra}

    def save_pretrained(self, path: Path) -> None:
        owner = self.owner if self.owner is not None else self.model
        if not hasattr(owner, "save_pretrained"):
            raise UsageError(f"{type(owner).__name__} has no save_pretrained; use `palette export` instead")
        owner.save_pretrained(path)


class VaeDecoder(nn.Module):
    """The part of a VAE that runs on device: latents -> image (post_quant_conv, then decoder),
    named as in the VAE so that recipes match Apple's module names."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder
        self.latent_channels = vae.config.latent_channels
        self.sample_size = vae.config.sample_size
        self.scaling_factor = vae.config.scaling_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def load_model(spec: str, subfolder: str | None = None, config: str | None = None) -> Loaded:
    """Resolve `--model` (see MODEL_HELP) into a model in eval mode, float32, on the CPU."""
    if spec == "default":
        return _load_default()
    if spec == "minilm":
        from .models.minilm import load_minilm

        model, tokenizer = load_minilm()
        return Loaded(model, "all-MiniLM-L6-v2", "text", _text_example(model), {"tokenizer": tokenizer})
    path = Path(spec)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, config)
    if config is not None:
        raise UsageError("--config applies to a .safetensors --model only")
    if path.is_dir():
        return _load_pretrained(str(path), subfolder, local=True)
    if path.exists():
        raise UsageError(f"--model {spec}: expected a directory or a .safetensors file")
    if HUB_ID.match(spec):
        return _load_pretrained(spec, subfolder, local=False)
    raise UsageError(f"--model {spec}: no such file or directory. --model takes {MODEL_HELP}")


def _load_default() -> Loaded:
    from .models.default import WEIGHTS_DIR, default_probe_inputs, load_default

    if not (WEIGHTS_DIR / "config.json").is_file():
        raise UsageError(f"the default model's weights are missing from {WEIGHTS_DIR}; reinstall palette")
    pipe = load_default()
    unet = pipe.unet
    example = _unet_example(unet, seq=16)

    def inputs(samples: int, seed: int) -> Any:
        return default_probe_inputs(n=samples, seed=seed, pipeline=pipe)

    loaded = Loaded(unet, "default (palette's embedded UNet)", "unet", example, make_inputs=inputs)
    loaded.pipeline = pipe  # type: ignore[attr-defined]  # the demo samples with it
    return loaded


def _read_config(name: str, subfolder: str | None, local: bool) -> dict[str, Any]:
    """The component's config.json, from the directory or the hub; clear errors for what fails."""
    if local:
        root = Path(name)
        cfg = root / (subfolder or "") / "config.json"
        if not cfg.is_file():
            if (root / "model_index.json").is_file():
                parts = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
                raise UsageError(
                    f"{name} is a pipeline; choose a component with --subfolder ({', '.join(parts)})"
                )
            raise UsageError(f"{cfg} not found: --model must be a from_pretrained directory")
        return json.loads(cfg.read_text())
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(name, "config.json", subfolder=subfolder)).read_text())
    except LocalEntryNotFoundError:
        raise UsageError(
            f"cannot reach the Hugging Face hub for {name} and it is not in the local cache (no "
            f"network, or HF_HUB_OFFLINE is set). Download it where there is access "
            f"(`huggingface-cli download {name}`) and pass the local directory with --model, or "
            "set HF_HUB_OFFLINE=1 to use a populated cache"
        ) from None
    except EntryNotFoundError:
        raise UsageError(
            f"{name} has no {subfolder + '/' if subfolder else ''}config.json; for a pipeline choose "
            "a component with --subfolder (unet, text_encoder, vae)"
        ) from None
    except OSError as e:  # repository not found, gated, or a network failure
        raise UsageError(f"cannot load {name} from the hub: {e}") from None


def _load_pretrained(name: str, subfolder: str | None, local: bool) -> Loaded:
    """A diffusers model (config `_class_name`) or a transformers one (`architectures`)."""
    cfg = _read_config(name, subfolder, local)
    kw: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
    label = f"{name}{'/' + subfolder if subfolder else ''}"
    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"], None)
        if cls is None:
            raise UsageError(f"{label}: diffusers has no class {cfg['_class_name']!r}")
        model = cls.from_pretrained(name, torch_dtype=torch.float32, low_cpu_mem_usage=False, **kw).eval()
        return _wrap_diffusers(model, label, name, subfolder)
    if "architectures" in cfg or "model_type" in cfg:
        import transformers

        arch = (cfg.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        model = (cls or transformers.AutoModel).from_pretrained(name, torch_dtype=torch.float32, **kw).eval()
        tokenizer = _tokenizer(name, subfolder)
        return Loaded(model, label, "text", _text_example(model), {"tokenizer": tokenizer} if tokenizer else {})
    raise UsageError(f"{label}: config.json names neither a diffusers class nor a transformers architecture")


def _tokenizer(name: str, subfolder: str | None) -> Any:
    """The tokenizer stored with a text encoder (its own folder, or the pipeline's `tokenizer`)."""
    from transformers import AutoTokenizer

    sub = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}.get(subfolder or "", subfolder)
    for candidate in dict.fromkeys([sub, subfolder]):
        try:
            return AutoTokenizer.from_pretrained(name, **({"subfolder": candidate} if candidate else {}))
        except (OSError, ValueError, TypeError):
            continue
    return None


def _wrap_diffusers(model: nn.Module, label: str, root: str, subfolder: str | None) -> Loaded:
    from diffusers import UNet2DConditionModel

    if isinstance(model, UNet2DConditionModel):
        return Loaded(model, label, "unet", _unet_example(model), _pipeline_parts(model, root, subfolder))
    if hasattr(model, "decoder") and hasattr(model.config, "latent_channels"):
        dec = VaeDecoder(model).eval()
        size = int(dec.sample_size if isinstance(dec.sample_size, int) else dec.sample_size[0]) // 8

        def inputs(samples: int, seed: int) -> Any:
            gen = torch.Generator().manual_seed(seed)
            z = torch.randn((samples, dec.latent_channels, size, size), generator=gen) / dec.scaling_factor
            return [(z[i : i + 1],) for i in range(samples)]

        example = (torch.zeros(1, dec.latent_channels, size, size),)
        return Loaded(dec, f"{label} (decoder)", "vae", example, make_inputs=inputs, owner=model)
    return Loaded(model, label, "module")


def _pipeline_parts(unet: nn.Module, root: str, subfolder: str | None) -> dict[str, Any]:
    """The pipeline's text encoder, tokenizer and scheduler, for real prompt embeddings and the
    model's own noise schedule when probing its UNet (skipped when absent or not matching)."""
    if subfolder != "unet":
        return {}
    parts: dict[str, Any] = {}
    try:
        from diffusers import DDPMScheduler

        parts["scheduler"] = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    except (OSError, ValueError):
        pass
    try:
        from transformers import AutoModel, AutoTokenizer

        encoder = AutoModel.from_pretrained(root, subfolder="text_encoder").eval()
        if getattr(encoder.config, "hidden_size", None) == unet.config.cross_attention_dim:
            parts["text_encoder"] = encoder
            parts["tokenizer"] = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
    except (OSError, ValueError):
        pass
    return parts


def _load_safetensors(path: Path, config: str | None) -> Loaded:
    """Weights from a .safetensors file, architecture from a config.json (default: next to it)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise UsageError(f"--model {path}: no such file")
    cfg_path = Path(config) if config else path.with_name("config.json")
    if not cfg_path.is_file():
        raise UsageError(f"{path} needs its architecture: pass --config path/to/config.json")
    cfg = json.loads(cfg_path.read_text())
    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"], None)
        if cls is None:
            raise UsageError(f"{cfg_path}: diffusers has no class {cfg['_class_name']!r}")
        model = cls.from_config(cfg)
    elif "model_type" in cfg:
        import transformers

        model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**cfg))
    else:
        raise UsageError(f"{cfg_path} names neither a diffusers class nor a transformers model_type")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise UsageError(
            f"{path} does not fit {type(model).__name__} from {cfg_path}: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]} weight(s)"
        )
    model = model.float().eval()
    if "_class_name" in cfg:
        return _wrap_diffusers(model, str(path), str(path.parent), None)
    return Loaded(model, str(path), "text", _text_example(model))


def _unet_example(unet: nn.Module, seq: int = 77) -> tuple[torch.Tensor, ...]:
    cfg = unet.config
    if cfg.addition_embed_type is not None or cfg.class_embed_type is not None:
        return ()  # SDXL-style extra conditioning: export from Python with your own inputs
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn((1, cfg.in_channels, *size), generator=gen),
        torch.tensor([500.0]),
        torch.randn((1, seq, cfg.cross_attention_dim), generator=gen),
    )


def _text_example(model: nn.Module) -> tuple[torch.Tensor, ...]:
    seq = min(77, int(getattr(model.config, "max_position_embeddings", 77)))
    return (torch.ones((1, seq), dtype=torch.long),)


# -- shared pieces -------------------------------------------------------------------------------


def _model(args: argparse.Namespace) -> Loaded:
    t0 = time.perf_counter()
    loaded = load_model(args.model, args.subfolder, args.config)
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


def _sensitivity(args: argparse.Namespace, loaded: Loaded):
    """Probe the model as the probe options say, or load `--sensitivity`."""
    from .probe import Sensitivity, probe_sensitivity

    importance = getattr(args, "importance", False)
    if getattr(args, "sensitivity", None):
        if importance:
            raise UsageError("--importance needs the probe's gradients: drop --sensitivity and probe here")
        return Sensitivity.load(_existing(args.sensitivity, "--sensitivity"))
    _note(args, f"probing {len(target_layers(loaded.model))} layers ({args.method}, {args.samples} samples)...")
    return probe_sensitivity(
        loaded.model, method=args.method, nbits=tuple(args.nbits), granularities=tuple(args.granularity),
        group_size=args.group_size, seed=args.seed, n_probes=args.probes, cache=args.cache,
        importance=importance, keep_sketch=importance, progress=not args.quiet,
        **loaded.probe_kwargs(args.samples, args.seed),
    )


def _existing(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such file")
    return p


def _recipe(args: argparse.Namespace, loaded: Loaded):
    from .recipe import ModelIdentity, Recipe

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


def _measure(args: argparse.Namespace, loaded: Loaded, mapping) -> dict[str, float]:
    from .measure import measure

    m = measure(loaded.model, mapping, seed=args.seed, **loaded.probe_kwargs(args.samples, args.seed))
    return {"psnr": m.psnr, "mse": m.mse, "cosine": m.cosine}


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.3f} MB"


# -- subcommands ---------------------------------------------------------------------------------


def cmd_analyze(args: argparse.Namespace) -> int:
    """Probe per-layer sensitivity and write it as JSON."""
    loaded = _model(args)
    sens = _sensitivity(args, loaded)
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

    loaded = _model(args)
    sens = _sensitivity(args, loaded)
    recipe = allocate_bits(loaded.model, args.budget_gb, budget_bits=args.budget_bits, sensitivity=sens,
                           importance=args.importance, seed=args.seed, progress=not args.quiet,
                           **loaded.probe_kwargs(args.samples, sens.seed))
    out = Path(args.output)
    recipe.info["command"] = "palette " + shlex.join(args.argv)
    if args.measure:
        _note(args, "measuring the recipe's real output PSNR...")
        recipe.info["measured"] = {**_measure(args, loaded, recipe.palettes(loaded.model)),
                                   "samples": args.samples, "seed": args.seed}
    recipe.save(out)
    result = {"path": str(out), "model": loaded.label, **_recipe_summary(recipe)}
    if args.measure:
        result["measured"] = recipe.info["measured"]
    if args.plot != "none":
        plot = Path(args.plot or out.with_suffix(".png"))
        _plot(loaded.model, plot, sens, args, loaded)
        result["plot"] = str(plot)
    lines = [
        f"{loaded.label}: {result['layers']} layers -> {_mb(recipe.size_bytes)} "
        f"(from {_mb(recipe.size_16bit_bytes)} at 16 bits), {recipe.bits_per_weight:.3f} bits per weight",
        "specs: " + ", ".join(f"{k} x{v}" for k, v in result["specs"].items()),
        f"predicted latent PSNR: {recipe.predicted_psnr:.2f} dB" if recipe.predicted_psnr else "nothing palettized",
    ]
    if args.measure:
        lines.append(f"measured latent PSNR: {result['measured']['psnr']:.2f} dB")
    lines.append(f"wrote {out}" + (f" and {result['plot']}" if "plot" in result else ""))
    return _emit(args, result, "\n".join(lines))


def _plot(model: nn.Module, path: Path, sens, args: argparse.Namespace, loaded: Loaded) -> None:
    """The PSNR-vs-size plot; by default its mixed-bit budgets start half a bit above the
    fewest candidate bits (below that no recipe fits)."""
    from .plot import plot_psnr_vs_size

    low = min(s.nbits for s in sens.specs) + 0.5
    bits = args.plot_bits or [b for b in PLOT_BITS if b >= low]
    _note(args, f"measuring the PSNR-vs-size curve ({len(bits)} mixed-bit budgets and uniform palettes)...")
    plot_psnr_vs_size(model, path, sensitivity=sens, bits=bits, seed=args.seed,
                      **loaded.probe_kwargs(args.samples, args.seed))


def cmd_apply(args: argparse.Namespace) -> int:
    """Palettize the model as the recipe says and save it with from_pretrained-ready weights."""
    loaded = _model(args)
    recipe = _recipe(args, loaded)
    result: dict[str, Any] = {"model": loaded.label, **_recipe_summary(recipe)}
    palettes = recipe.palettes(loaded.model)
    if args.measure:
        result["measured"] = _measure(args, loaded, palettes)
    apply_palettes(loaded.model, palettes)
    out = Path(args.output)
    loaded.save_pretrained(out)
    result.update(path=str(out), palettized=len(palettes))
    text = (f"palettized {len(palettes)} of {len(recipe.layers)} layers "
            f"({recipe.bits_per_weight:.3f} bits per weight, {_mb(recipe.size_bytes)} as stored)")
    if args.measure:
        text += f"; measured latent PSNR {result['measured']['psnr']:.2f} dB"
    text += (f"\nwrote {out} (weights equal LUT[indices], dense: load it with from_pretrained; "
             "`palette export` writes the compact forms)")
    return _emit(args, result, text)


def cmd_export(args: argparse.Namespace) -> int:
    """Write a verified Core ML mlpackage, or the palettes as safetensors."""
    loaded = _model(args)
    recipe = _recipe(args, loaded)
    out = Path(args.output)
    result: dict[str, Any] = {"model": loaded.label, "path": str(out), **_recipe_summary(recipe)}
    if out.suffix == ".safetensors":
        from .export import export_palettes

        result["file_bytes"] = export_palettes(recipe.palettes(loaded.model), out)
        text = f"wrote {out}: {result['file_bytes']:,} bytes of palettes for {len(recipe.palettized)} layers"
        return _emit(args, result, text)
    if out.suffix != ".mlpackage":
        raise UsageError(f"-o {out}: the output must end in .mlpackage (Core ML) or .safetensors (palettes)")
    if not loaded.example:
        raise UsageError(f"{loaded.label}: no example inputs for tracing this model; use export_coreml from Python")
    from .export import export_coreml

    _note(args, "tracing and converting to Core ML (about half a minute for a small UNet)...")
    report = export_coreml(loaded.model, out, loaded.example, recipe=recipe.palettes(loaded.model),
                           max_chunk_bytes=_chunk_bytes(args))
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
    loaded = _model(args)
    recipe = _recipe(args, loaded)
    palettes = recipe.palettes(loaded.model)
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
                       help="component of a pipeline: unet, text_encoder, text_encoder_2 or vae")
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
    g.add_argument("--nbits", type=int, nargs="+", choices=NBITS, default=list(NBITS), metavar="N",
                   help=f"candidate bit-widths, among {' '.join(map(str, NBITS))}")
    g.add_argument("--granularity", nargs="+", choices=GRANULARITIES, default=list(GRANULARITIES),
                   metavar="G", help="candidate LUT granularities: per_tensor, per_grouped_channel")
    g.add_argument("--group-size", type=_positive, default=16, metavar="N",
                   help="output channels per LUT (per_grouped_channel)")
    g.add_argument("--samples", type=_positive, default=8, metavar="N", help="probe samples (data-free, synthesised)")
    g.add_argument("--probes", type=_positive, default=16, metavar="K", help="random projections (fast method)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the probe inputs and of vector k-means")
    g.add_argument("--cache", metavar="DIR", help="directory to resume an interrupted probe from")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


EPILOG = """\
examples:
  palette demo                                     # the main job on the default model, into out/
  palette analyze --model minilm -o sens.json
  palette allocate --model minilm --budget-bits 3 --sensitivity sens.json -o recipe.json
  palette export --model minilm --recipe recipe.json -o minilm.mlpackage
  palette verify minilm.mlpackage --model minilm --recipe recipe.json
  palette allocate --model path/to/sd15 --subfolder unet --budget-gb 0.75 -o unet.json

exit status: 0 success, 1 failure (e.g. a benchmark failed), 2 bad arguments or inputs
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
    p.add_argument("--measure", action="store_true",
                   help="also measure the recipe's real output PSNR (recorded in the recipe's info)")

    recipe_opts = argparse.ArgumentParser(add_help=False)
    recipe_opts.add_argument("--recipe", required=True, metavar="JSON", help="recipe JSON from `palette allocate`")

    p = add("apply", cmd_apply, "palettize a model as a recipe says and save it (from_pretrained format)",
            [common, recipe_opts])
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="directory to write (save_pretrained)")
    p.add_argument("--measure", action="store_true", help="also measure the real output PSNR")
    p.add_argument("--samples", type=_positive, default=8, metavar="N", help="probe samples for --measure")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the probe inputs for --measure")

    p = add("export", cmd_export, "export a verified Core ML mlpackage or the palettes as safetensors",
            [common, recipe_opts])
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="NAME.mlpackage (Core ML) or NAME.safetensors (palettes)")
    chunk = p.add_mutually_exclusive_group()
    chunk.add_argument("--max-chunk-mb", type=_positive_float, metavar="MB",
                       help="also split the mlpackage into chunks of at most MB decimal megabytes of weights "
                       "each (iOS maps each model file under a limit, ~1000 MB), written with a "
                       "manifest.json to NAME_chunks/")
    chunk.add_argument("--max-chunk-bytes", type=_positive, metavar="N", help="the same limit in bytes")

    p = add("verify", cmd_verify, "check an mlpackage or palettes file bit for bit against a recipe and model",
            [common, recipe_opts])
    p.add_argument("path", help="the .mlpackage or .safetensors to check")

    p = add("bench", cmd_bench, "run the benchmarks in benchmarks/ (source checkout)", [_common(model=False)])
    p.add_argument("names", nargs="*", help="benchmarks to run (bench_<name>.py); all by default")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="arguments after -- go to every script")

    p = add("demo", cmd_demo, "the main job on the default model: probe, allocate, export, sample, plot",
            [_common(model=False)])
    p.add_argument("--out", default="out", metavar="DIR", help="directory for the recipes, mlpackage and PNGs")
    p.add_argument("--fast", action="store_true", help="a smoke run: per-tensor candidates, smaller probe, fewer prompts and steps")
    p.add_argument("--no-export", action="store_true", help="skip the Core ML export (about half a minute)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of probe inputs and samples")
    return parser


def _chunk_bytes(args: argparse.Namespace) -> int | None:
    """The export's per-chunk weight limit in bytes, from --max-chunk-mb or --max-chunk-bytes."""
    if args.max_chunk_mb is not None:
        return int(args.max_chunk_mb * 1e6)
    return args.max_chunk_bytes


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "extra", None) and args.extra[0] == "--":
        args.extra = args.extra[1:]
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"palette: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("palette: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
