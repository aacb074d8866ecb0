"""Model loaders: the name a user gives (`default`, `minilm`, a local `from_pretrained` directory, a
Hugging Face hub id, or a `.safetensors` file with its config) -> a `Loaded` model in eval mode,
float32, on the CPU, with what probing, export and saving need to know about it: example inputs
for tracing, its probe set, the pipeline parts (text encoder, tokenizer, scheduler) that make real
probe inputs, and what `save_pretrained` writes. The VAE is handled as its decoder (`VaeDecoder`).
Used by the command line and the demo."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._jsonio import LoadError as _FileLoadError, read_json
from ..probe import ProbeSet, make_probe_set
from ..probe.pipeline_inputs import VaeDecoder

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_HELP = (
    "'default' (the embedded default UNet), 'minilm' (all-MiniLM-L6-v2), 'default-pipeline' (both, "
    "one budget: allocate, apply, export; or a diffusers pipeline folder), a local from_pretrained "
    "directory, a Hugging Face hub id (e.g. stabilityai/stable-diffusion-2-1-base with --subfolder "
    "unet), or a .safetensors file (with --config)"
)


PALETTES_FILE = "palettes.safetensors"  # the palettes a `palette apply` folder carries


class LoadError(_FileLoadError):
    """The model a user named cannot be loaded: the message says why and what to do (a
    `palette._jsonio.LoadError`, so a ValueError)."""


@dataclass
class Loaded:
    """A model the CLI works on, with what probing, export and saving need to know about it."""

    model: nn.Module
    label: str
    kind: str  # "unet", "dit", "text", "vae" or "module"
    example: tuple[torch.Tensor, ...] | dict[str, Any] = ()  # Core ML export's example inputs (batch of 1)
    probe_extra: dict[str, Any] = field(default_factory=dict)  # text_encoder / tokenizer / scheduler
    make_inputs: Callable[[int, int], Any] | None = None  # (samples, seed) -> probe inputs
    owner: nn.Module | None = None  # what save_pretrained writes (the whole VAE for its decoder)
    pipeline: Any = None  # the default model's pipeline, which the demo samples with
    hub_id: str | None = None  # the Hugging Face hub id it was loaded from (Apple's scripts load it)

    def probe_set(self, samples: int, seed: int, batch_size: int | None = None,
                  sample_size: int | None = None) -> ProbeSet:
        """The probe set of `samples` samples (seeded): built once, then used to probe, calibrate
        and measure alike. `batch_size` and `sample_size` apply to synthesised inputs."""
        if self.make_inputs is not None:
            return make_probe_set(self.model, self.make_inputs(samples, seed), seed=seed)
        return make_probe_set(self.model, seed=seed, n_samples=samples, batch_size=batch_size,
                              sample_size=sample_size, **self.probe_extra)

    def save_pretrained(self, path: Path) -> None:
        owner = self.owner if self.owner is not None else self.model
        if not hasattr(owner, "save_pretrained"):
            raise LoadError(f"{type(owner).__name__} has no save_pretrained; use `palette export` instead")
        owner.save_pretrained(path)


def load_model(spec: str, subfolder: str | None = None, config: str | None = None) -> Loaded:
    """Resolve `--model` (see MODEL_HELP) into a model in eval mode, float32, on the CPU."""
    if spec == "default":
        return _load_default()
    if spec == "minilm":
        from .minilm import load_minilm

        model, tokenizer = load_minilm()
        return Loaded(model, "all-MiniLM-L6-v2", "text", _text_example(model), {"tokenizer": tokenizer})
    path = Path(spec)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, config)
    if config is not None:
        raise LoadError("--config applies to a .safetensors --model only")
    if path.is_dir():
        return _load_pretrained(str(path), subfolder, local=True)
    if path.exists():
        raise LoadError(f"--model {spec}: expected a directory or a .safetensors file")
    if HUB_ID.match(spec):
        return _load_pretrained(spec, subfolder, local=False)
    raise LoadError(f"--model {spec}: no such file or directory. --model takes {MODEL_HELP}")


def _load_default() -> Loaded:
    from .default import WEIGHTS_DIR, default_probe_inputs, load_default

    if not (WEIGHTS_DIR / "config.json").is_file():
        raise LoadError(f"the default model's weights are missing from {WEIGHTS_DIR}; reinstall palette")
    pipe = load_default()
    unet = pipe.unet
    example = _unet_example(unet, seq=16)

    def inputs(samples: int, seed: int) -> Any:
        return default_probe_inputs(n=samples, seed=seed, pipeline=pipe)

    return Loaded(unet, "default (palette's embedded UNet)", "unet", example, make_inputs=inputs, pipeline=pipe)


def _read_config(name: str, subfolder: str | None, local: bool) -> dict[str, Any]:
    """The component's config.json, from the directory or the hub; clear errors for what fails."""
    if local:
        root = Path(name)
        cfg = root / (subfolder or "") / "config.json"
        if not cfg.is_file():
            if (root / "model_index.json").is_file():
                parts = ", ".join(sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()))
                if subfolder:
                    raise LoadError(f"--subfolder {subfolder}: {name} has no such component (no "
                                    f"{subfolder}/config.json); its components: {parts}")
                raise LoadError(f"{name} is a pipeline; choose a component with --subfolder ({parts})")
            raise LoadError(f"{cfg} not found: --model must be a from_pretrained directory")
        return _config_dict(read_json(cfg, "config.json"), cfg)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        cfg_file = Path(hf_hub_download(name, "config.json", subfolder=subfolder))
        return _config_dict(read_json(cfg_file, "config.json"), cfg_file)
    except LocalEntryNotFoundError:
        raise LoadError(
            f"cannot reach the Hugging Face hub for {name} and it is not in the local cache (no "
            f"network, or HF_HUB_OFFLINE is set). Download it where there is access "
            f"(`huggingface-cli download {name}`) and pass the local directory with --model, or "
            "set HF_HUB_OFFLINE=1 to use a populated cache"
        ) from None
    except EntryNotFoundError:
        raise LoadError(
            f"{name} has no {subfolder + '/' if subfolder else ''}config.json; for a pipeline choose "
            "a component with --subfolder (unet or transformer, text_encoder, vae)"
        ) from None
    except OSError as e:  # repository not found, gated, or a network failure
        raise LoadError(f"cannot load {name} from the hub: {e}") from None


def _config_dict(cfg: Any, path: Path) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise LoadError(f"{path}: not a model config (expected a JSON object)")
    return cfg


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _load_pretrained(name: str, subfolder: str | None, local: bool) -> Loaded:
    """A diffusers model (config `_class_name`) or a transformers one (`architectures`), carrying
    the palettes a `palette apply` folder holds beside its weights."""
    loaded = _load_component(name, subfolder, local)
    loaded.hub_id = None if local else name
    if local:
        _carry_saved_palettes(loaded, Path(name) / (subfolder or "") / PALETTES_FILE)
    return loaded


def _carry_saved_palettes(loaded: Loaded, path: Path) -> None:
    """Attach the palettes of `path` (written by `palette apply`) if it exists and still matches
    the weights exactly; a LoadError if it does not."""
    if not path.is_file():
        return
    from ..export import load_palettes
    from ..metadata import exact_weight
    from ..palettize import apply_palettes

    palettes = load_palettes(path)
    modules = dict(loaded.model.named_modules())
    stale = [n for n, p in palettes.items()
             if n not in modules or not torch.equal(exact_weight(p).reshape(modules[n].weight.shape),
                                                    modules[n].weight.detach().float())]
    if stale:
        raise LoadError(
            f"{path} does not match the weights beside it ({len(stale)} layer(s), e.g. {stale[0]}): "
            f"the weights were changed after `palette apply`; delete {path.name} or apply the recipe again"
        )
    apply_palettes(loaded.model, palettes)


def _load_component(name: str, subfolder: str | None, local: bool) -> Loaded:
    label = f"{name}{'/' + subfolder if subfolder else ''}"
    try:
        return _load_component_unchecked(name, subfolder, local)
    except LoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        # no weights in the folder, damaged weight files, a config the library cannot build
        raise LoadError(f"--model {label}: cannot load it ({type(e).__name__}: {_first_line(e)})") from None


def _load_component_unchecked(name: str, subfolder: str | None, local: bool) -> Loaded:
    cfg = _read_config(name, subfolder, local)
    kw: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
    label = f"{name}{'/' + subfolder if subfolder else ''}"
    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"], None)
        if cls is None:
            raise LoadError(f"{label}: diffusers has no class {cfg['_class_name']!r}")
        model = cls.from_pretrained(name, torch_dtype=torch.float32, low_cpu_mem_usage=False, **kw).eval()
        return _wrap_diffusers(model, label, name, subfolder)
    if "architectures" in cfg or "model_type" in cfg:
        import transformers

        arch = (cfg.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        model = (cls or transformers.AutoModel).from_pretrained(name, torch_dtype=torch.float32, **kw).eval()
        tokenizer = _tokenizer(name, subfolder)
        return Loaded(model, label, "text", _text_example(model), {"tokenizer": tokenizer} if tokenizer else {})
    raise LoadError(f"{label}: config.json names neither a diffusers class nor a transformers architecture")


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

    from ..probe.dit_inputs import is_dit

    if isinstance(model, UNet2DConditionModel):
        return Loaded(model, label, "unet", _unet_example(model), _pipeline_parts(model, root, subfolder))
    if is_dit(model):  # data-free inputs with the pipeline's own noise schedule (its text encoders stay unloaded)
        extra = _pipeline_scheduler(root) if subfolder else {}
        return Loaded(model, label, "dit", _dit_example(model, extra.get("scheduler")), probe_extra=extra)
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


def _pipeline_scheduler(root: str) -> dict[str, Any]:
    """The pipeline's scheduler (the class its `scheduler/scheduler_config.json` names), for the
    noise levels of a diffusion transformer's synthesised probe inputs; {} when it has none."""
    import diffusers

    try:
        cfg = diffusers.DDPMScheduler.load_config(root, subfolder="scheduler")  # any scheduler's config file
        cls = getattr(diffusers, str(cfg.get("_class_name")), None)
        return {"scheduler": cls.from_config(cfg)} if cls is not None else {}
    except (OSError, ValueError, TypeError):
        return {}


def _load_safetensors(path: Path, config: str | None) -> Loaded:
    """Weights from a .safetensors file, architecture from a config.json (default: next to it)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise LoadError(f"--model {path}: no such file")
    cfg_path = Path(config) if config else path.with_name("config.json")
    if not cfg_path.is_file():
        raise LoadError(f"{path} needs its architecture: pass --config path/to/config.json")
    cfg = _config_dict(read_json(cfg_path, "config.json"), cfg_path)
    try:
        return _build_from_safetensors(path, cfg_path, cfg, load_file)
    except LoadError:
        raise
    except Exception as e:  # noqa: BLE001 -- safetensors' and the libraries' errors for a damaged file or config
        raise LoadError(f"--model {path}: cannot load it with {cfg_path} ({type(e).__name__}: {_first_line(e)}); "
                        "is the file complete, and the config the one it was saved with?") from None


def _build_from_safetensors(path: Path, cfg_path: Path, cfg: dict[str, Any], load_file: Callable) -> Loaded:
    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"], None)
        if cls is None:
            raise LoadError(f"{cfg_path}: diffusers has no class {cfg['_class_name']!r}")
        model = cls.from_config(cfg)
    elif "model_type" in cfg:
        import transformers

        model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**cfg))
    else:
        raise LoadError(f"{cfg_path} names neither a diffusers class nor a transformers model_type")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise LoadError(
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


def _dit_example(model: nn.Module, scheduler: Any) -> dict[str, Any]:
    """A transformer's data-free sample (batch 1, the pipeline's default resolution) by keyword, for
    export: its tensors become the Core ML inputs."""
    from ..probe.dit_inputs import example_input

    ex = example_input(model, scheduler=scheduler)
    return {**dict(zip(inspect.signature(model.forward).parameters, ex.args)), **ex.kwargs}


def _text_example(model: nn.Module) -> tuple[torch.Tensor, ...]:
    seq = min(77, int(getattr(model.config, "max_position_embeddings", 77)))
    return (torch.ones((1, seq), dtype=torch.long),)
