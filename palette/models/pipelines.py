"""Whole pipelines for the command line: `default-pipeline` (palette's default model: frozen MiniLM
text encoder + the trained UNet) or a local diffusers pipeline folder (`model_index.json`: text
encoder, UNet, VAE, tokenizer, scheduler)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .load import LoadError

DEFAULT_PIPELINE = "default-pipeline"


def is_pipeline(spec: str) -> bool:
    """Whether `--model` names a whole pipeline rather than one model."""
    return spec == DEFAULT_PIPELINE or (Path(spec).is_dir() and (Path(spec) / "model_index.json").is_file())


def load_pipeline(spec: str) -> tuple[Any, str, list[str]]:
    """(pipeline, label, probe prompts): the default pipeline probes with its training captions
    (the held-out ones are left for validation), others with the built-in prompt list."""
    if spec == DEFAULT_PIPELINE:
        from .data import split_scenes
        from .default import WEIGHTS_DIR, load_default

        if not (WEIGHTS_DIR / "config.json").is_file():
            raise LoadError(f"the default model's weights are missing from {WEIGHTS_DIR}; reinstall palette")
        train = split_scenes()[0]
        return load_default(), "default pipeline (MiniLM + palette's UNet)", [s.caption for s in train[::25]]
    if not is_pipeline(spec):
        raise LoadError(f"--model {spec}: not a pipeline ('{DEFAULT_PIPELINE}' or a diffusers pipeline folder "
                        "with model_index.json)")
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LoadError(f"--model {spec}: cannot load the pipeline: {str(e).splitlines()[0]}") from None
    return pipe, f"{type(pipe).__name__} from {spec}", []
