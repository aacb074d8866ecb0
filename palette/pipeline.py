"""One budget for a whole pipeline: text encoder, denoiser and VAE decoder allocated jointly, every
layer judged on the generated image.

`allocate_pipeline(pipeline, budget_gb=...)` (also `allocate_bits` given a pipeline) builds the
pipeline as one module (`PipelineOutput`: prompts and seeded noise -> a few sampler steps with the
pipeline's own scheduler -> the image), probes every layer of every component against that one
output, runs one knapsack over all of them (`allocate_bits` on that module) with the measured
correction for interacting layers and calibration (`refine_recipe`), and splits the joint recipe
by component into a `PipelineRecipe`: one `Recipe` per component (names as in the component, so
each applies and exports on its own) and the total.

Errors are comparable across components because they are all the same quantity: the change of the
same images (per sample, MSE over pixels) that palettizing one layer causes, whatever component the
layer is in; text encoder errors reach the image through the denoiser's conditioning, denoiser
errors through the sampler steps and the decoder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._jsonio import read_json, write_atomic
from ._version import __version__
from .allocate import allocate_bits
from .palettize import palettize, palettized
from .probe import Sensitivity, probe_sensitivity
from .probe.pipeline_inputs import (
    COMPONENTS,
    DECODER,
    PIPELINE_SAMPLES,
    PROBE_STEPS,
    PipelineOutput,
    VaeDecoder,
    check_components,
)
from .recipe import Candidates, Recipe
from .spec import PaletteSpec

FORMAT = "palette.pipeline_recipe"
VERSION = 1
DEFAULT_GUIDANCE = 7.5  # diffusers' Stable Diffusion default, for pipelines that do not say
REFINE_ROUNDS = 2  # default rounds of the measured correction (`refine_recipe`) for a pipeline
EXTRAS = ("tokenizer", "scheduler", "guidance_scale", "max_tokens", "attention_mask", "denoise")


def _uses_mask(text_encoder: nn.Module) -> bool:
    """Whether the pipeline passes an attention mask to its text encoder: as diffusers' Stable
    Diffusion does, only where the config asks for it for CLIP; always for other encoders (BERT)."""
    cfg = getattr(text_encoder, "config", None)
    flag = getattr(cfg, "use_attention_mask", None)
    if flag is not None:
        return bool(flag)
    return "clip" not in str(getattr(cfg, "model_type", "")).lower()


def pipeline_model(pipeline: Any, *, steps: int = PROBE_STEPS, guidance_scale: float | None = None) -> PipelineOutput:
    """The pipeline as one module (`PipelineOutput`), sharing its components (nothing copied).

    `pipeline`: a `PipelineOutput`, a diffusers pipeline or palette's `DefaultPipeline` (attributes
    `text_encoder`, `unet`, `vae` (optional), `tokenizer`, `scheduler`), or a mapping of named
    components (`text_encoder`, `unet`, `vae_decoder` or `vae`) with `tokenizer` and `scheduler`
    (and optionally `guidance_scale`, `max_tokens`, `attention_mask`, and `denoise(x, t,
    text_states)`: how the pipeline calls its denoiser, when it is not a UNet's call)."""
    if isinstance(pipeline, PipelineOutput):
        return pipeline if steps == pipeline.steps else pipeline.with_steps(steps)
    if isinstance(pipeline, Mapping):
        parts = dict(pipeline)
    elif isinstance(pipeline, nn.Module):
        raise ValueError(f"a {type(pipeline).__name__} is one model, not a pipeline: pass a diffusers pipeline or "
                         f"a mapping of named components {list(COMPONENTS)} with tokenizer and scheduler")
    else:
        parts = {n: getattr(pipeline, n, None) for n in ("text_encoder", "unet", "vae", "transformer", *EXTRAS)}
        parts = {n: v for n, v in parts.items() if v is not None}
    if "vae" in parts:
        if DECODER in parts:
            raise ValueError("give the VAE as 'vae' or its decoder as 'vae_decoder', not both")
        parts[DECODER] = VaeDecoder(parts.pop("vae")).eval()
    extras = {k: parts.pop(k) for k in EXTRAS if k in parts}
    check_components(parts)
    for need in ("tokenizer", "scheduler"):
        if extras.get(need) is None:
            raise ValueError(f"the pipeline has no {need}: it is needed to run the pipeline on prompts")
    g = guidance_scale if guidance_scale is not None else extras.get("guidance_scale", DEFAULT_GUIDANCE)
    mask = extras.get("attention_mask", _uses_mask(parts["text_encoder"]))
    return PipelineOutput(parts, extras["tokenizer"], extras["scheduler"], steps=steps, guidance_scale=float(g),
                          max_tokens=extras.get("max_tokens"), attention_mask=bool(mask), denoise=extras.get("denoise"))


@dataclass
class PipelineRecipe:
    """One recipe per component (its layer names as in the component) under one total budget."""

    components: dict[str, Recipe]
    predicted_psnr: float | None = None  # image PSNR of the whole recipe (measured on the probe runs)
    palette_version: str = __version__
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """Every component as stored."""
        return sum(r.size_bytes for r in self.components.values())

    @property
    def size_16bit_bytes(self) -> int:
        return sum(r.size_16bit_bytes for r in self.components.values())

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per target weight over all components."""
        numel = sum(math.prod(s) for r in self.components.values() for s in r.shapes.values())
        return 8 * sum(r.size_bytes - r.fixed_bytes for r in self.components.values()) / numel

    # -- applying ------------------------------------------------------------------------------
    def _pairs(self, pipeline: Any) -> list[tuple[nn.Module, Recipe]]:
        comps = pipeline_model(pipeline).components
        missing = [n for n in self.components if n not in comps]
        if missing:
            raise ValueError(f"the pipeline has no component(s) {missing} (it has {sorted(comps)})")
        for n, r in self.components.items():
            try:
                r.check(comps[n])
            except ValueError as e:
                raise ValueError(f"component {n!r}: {e}") from None
        return [(comps[n], r) for n, r in self.components.items()]

    def apply(self, pipeline: Any, *, progress: bool = False) -> None:
        """Palettize every component in place as its recipe says (all checked first)."""
        for module, recipe in self._pairs(pipeline):
            palettize(module, recipe, progress=progress)

    @contextmanager
    def applied(self, pipeline: Any) -> Iterator[None]:
        """Every component palettized inside the block, restored exactly after it."""
        pairs = self._pairs(pipeline)
        with ExitStack() as stack:
            for module, recipe in pairs:
                stack.enter_context(palettized(module, recipe.palettes(module)))
            yield

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "palette_version": self.palette_version,
                "size_bytes": self.size_bytes, "predicted_psnr": self.predicted_psnr, "info": self.info,
                "components": {n: r.to_dict() for n, r in self.components.items()}}

    def dumps(self) -> str:
        """Deterministic JSON: same recipe, same bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, self.dumps())

    @classmethod
    def from_dict(cls, d: Any, where: str = "pipeline recipe") -> "PipelineRecipe":
        try:
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} document (format={d.get('format') if isinstance(d, dict) else None!r})")
            if d.get("version") != VERSION:
                raise ValueError(f"unsupported version {d.get('version')!r}; this palette reads {VERSION}")
            expected = {"format", "version", "palette_version", "size_bytes", "predicted_psnr", "info", "components"}
            if set(d) != expected:
                raise ValueError(f"unexpected or missing keys: {sorted(set(d) ^ expected)}")
            comps = d["components"]
            if not isinstance(comps, dict) or not comps:
                raise ValueError("components must be a non-empty object")
            unknown = [n for n in comps if n not in COMPONENTS]
            if unknown:
                raise ValueError(f"unknown component(s) {unknown}; a pipeline has {list(COMPONENTS)}")
            psnr = d["predicted_psnr"]
            if psnr is not None and (isinstance(psnr, bool) or not isinstance(psnr, (int, float))):
                raise ValueError(f"predicted_psnr must be a number or null, got {psnr!r}")
            out = cls({n: Recipe.from_dict(r, f"component {n!r}") for n, r in comps.items()},
                      None if psnr is None else float(psnr), str(d["palette_version"]), dict(d["info"]))
            if out.size_bytes != d["size_bytes"]:
                raise ValueError(f"size_bytes {d['size_bytes']} is not the sum of its components ({out.size_bytes})")
            return out
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{where}: invalid pipeline recipe: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PipelineRecipe":
        return cls.from_dict(read_json(path, "pipeline recipe", "; regenerate it with allocate_bits"), str(path))


def split_recipe(joint: Recipe, model: PipelineOutput, sensitivity: Sensitivity | None = None) -> PipelineRecipe:
    """The joint recipe of `model` (layer names prefixed by component) as one recipe per component.
    With the `sensitivity` it came from, each component's recipe records in its info the image PSNR
    predicted with that component alone palettized."""
    comps = {}
    for name, module in model.components.items():
        prefix = name + "."
        layers = {n[len(prefix):]: s for n, s in joint.layers.items() if n.startswith(prefix)}
        if not layers:
            continue
        modules = dict(module.named_modules())
        info = {"pipeline_component": name, "budget": "shared with the pipeline's other components"}
        if sensitivity is not None:
            info["image_psnr_alone"] = sensitivity.predict_psnr(
                {prefix + n: s for n, s in layers.items() if s is not None})
        recipe = Recipe.dense(module, {n: modules[n] for n in layers}, seed=joint.seed, info=info)
        recipe.layers.update(layers)
        recipe.luts = {n[len(prefix):]: t for n, t in joint.luts.items() if n.startswith(prefix)}
        comps[name] = recipe
    out = PipelineRecipe(comps, joint.predicted_psnr, joint.palette_version, dict(joint.info))
    if out.size_bytes != joint.size_bytes:
        raise ValueError(f"the components share parameters: their sizes add up to {out.size_bytes} B, the "
                         f"pipeline stores {joint.size_bytes} B")
    return out


def allocate_pipeline(
    pipeline: Any,
    budget_gb: float | None = None,
    *,
    budget_bits: float | None = None,
    prompts: Sequence[str] | None = None,
    n_samples: int = PIPELINE_SAMPLES,
    steps: int = PROBE_STEPS,
    guidance_scale: float | None = None,
    sensitivity: Sensitivity | None = None,
    candidates: Candidates | Sequence[PaletteSpec] | None = None,
    method: str = "fast",
    n_probes: int | None = None,
    seed: int = 0,
    calibrate: bool = True,
    refine: int | None = None,
    cache: str | None = None,
    progress: bool = True,
) -> PipelineRecipe:
    """One recipe per component whose total stored size fits the budget, chosen jointly: every
    layer of every component competes in one knapsack, its error measured on the generated image.

    `budget_gb`: decimal GB of all components as stored; `budget_bits`: average bits per target
    weight over all components. Probe runs: `n_samples` prompts (`prompts`, else the built-in
    list) with seeds `seed`, `seed + 1`, ..., `steps` steps of the pipeline's own scheduler.
    `calibrate` runs the recipe's pipeline once on those inputs and makes that its
    `predicted_psnr` (the additive estimate stays in `info["additive_psnr"]`); with it, `refine`
    rounds (default `REFINE_ROUNDS`) of the measured correction for interacting layers
    (`refine_recipe`: per-component measured / additive error ratios, knapsack again, the best
    recipe measured on the probe runs kept). The pipeline is not modified."""
    model = pipeline_model(pipeline, steps=steps, guidance_scale=guidance_scale)
    probe = model.probe_set(prompts, seed=seed, n_samples=n_samples)
    if sensitivity is None:
        sensitivity = probe_sensitivity(model, probe, candidates, method=method, n_probes=n_probes, seed=seed,
                                        cache=cache, progress=progress)
    joint = allocate_bits(model, budget_gb, budget_bits=budget_bits, inputs=probe, sensitivity=sensitivity,
                          candidates=candidates, seed=seed, calibrate=calibrate,
                          refine=REFINE_ROUNDS if refine is None else refine, progress=progress)
    joint.info["pipeline"] = {"components": list(model.components), "steps": steps,
                              "guidance_scale": model.guidance_scale, "samples": n_samples}
    return split_recipe(joint, model, sensitivity)


__all__ = ["PipelineRecipe", "allocate_pipeline", "pipeline_model", "split_recipe"]
