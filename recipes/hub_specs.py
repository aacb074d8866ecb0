"""Recompute the size figures of `recipes/hub_specs.json` from the architectures alone.

Each denoiser is built on the meta device (`palette.models.zoo`, no weights), and its palette
figures computed as `allocate_bits` counts them: target layers (`target_layers`, default
`min_numel`), parameters, the 16-bit size (every parameter at 2 bytes), the smallest size palette
reaches with its default candidates (every target layer 1-bit per_tensor plus its 2-entry fp16 LUT,
every other parameter at 16 bits), and, per device budget (decimal GB, whole component as stored),
whether it fits and the average bits a target weight can then take (LUTs included, at most 16).
Components get `budgets_gb` (the budgets `recipes/README.md` has commands for): the device budgets
they fit in below their 16-bit size. Deterministic: same palette and diffusers, same file.

    python recipes/hub_specs.py            # rewrite recipes/hub_specs.json
    python recipes/hub_specs.py --check    # exit 1 if the file differs from what it would write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from palette.allocate import GB  # noqa: E402
from palette.models.zoo import FULL_CONFIG_SOURCES, build  # noqa: E402
from palette.palettize import target_layers  # noqa: E402
from palette.recipe import fixed_bytes  # noqa: E402
from palette.spec import PaletteSpec  # noqa: E402

PATH = Path(__file__).with_name("hub_specs.json")
# 0.5 / 1 / 1.5 GB: a denoiser's share of an iPhone pipeline under 2 GB (text encoders and VAE
# take the rest); 2 GB: that whole iPhone budget; 4 GB: iPad / iPhone Pro (8 GB RAM) with the
# increased-memory entitlement; 8 GB: a 16 GB Mac.
DEVICE_BUDGETS_GB = (0.5, 1.0, 1.5, 2.0, 4.0, 8.0)
SMALLEST = PaletteSpec(nbits=1, granularity="per_tensor")
# (spec name, zoo architecture, title): the UNets get figures only; the transformers are added.
UNETS = {"sd15": "sd15-unet", "sdxl": "sdxl-unet"}
TRANSFORMERS = (
    ("sd3-medium", "sd3", "Stable Diffusion 3 Medium"),
    ("sd35-large", "sd35-large", "Stable Diffusion 3.5 Large"),
    ("flux-schnell", "flux-schnell", "FLUX.1 [schnell]"),
    ("flux-dev", "flux-dev", "FLUX.1 [dev]"),
    ("pixart-sigma", "pixart-sigma", "PixArt-Sigma XL-2 1024-MS"),
    ("sana-600m", "sana-600m", "SANA 0.6B 1024px"),
    ("sana-1600m", "sana-1600m", "SANA 1.6B 1024px"),
)
FIGURES_NOTE = (
    "Per component, from its architecture on the meta device (python recipes/hub_specs.py): "
    "target_layers (palette's default min_numel), parameters, size_16bit_bytes (every parameter at 2 bytes), "
    "smallest_bytes (every target layer 1-bit per_tensor plus LUT, other parameters at 16 bits), and per "
    "device budget (decimal GB, the component as stored) whether it fits and the average bits per target "
    "weight it allows (LUTs included, at most 16)."
)


def figures(arch: str) -> dict[str, Any]:
    """The palette size figures of zoo architecture `arch` (built on the meta device)."""
    model = build(arch, device="meta")
    targets = target_layers(model)
    fixed = fixed_bytes(model, targets)
    numel = sum(m.weight.numel() for m in targets.values())
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    full = 2 * params
    smallest = fixed + sum(SMALLEST.nbytes(tuple(m.weight.shape), n) for n, m in targets.items())
    budgets = []
    for gb in DEVICE_BUDGETS_GB:
        capacity = int(gb * GB)
        fits = capacity >= smallest
        bits = round(min(16.0, 8 * (capacity - fixed) / numel), 3) if fits else None
        budgets.append({"budget_gb": gb, "fits": fits, "bits_per_weight": bits})
    return {
        "target_layers": len(targets),
        "parameters": params,
        "size_16bit_bytes": full,
        "smallest_bytes": smallest,
        "smallest_bits_per_weight": round(8 * (smallest - fixed) / numel, 4),
        "device_budgets": budgets,
        "_commands": [b["budget_gb"] for b in budgets if b["fits"] and b["budget_gb"] * GB < full],
    }


def updated(specs: dict[str, Any]) -> dict[str, Any]:
    """`specs` with the UNets' figures and the transformers' entries (re)computed."""
    specs = dict(specs, device_budgets_gb=list(DEVICE_BUDGETS_GB), figures=FIGURES_NOTE)
    names = {name for name, _, _ in TRANSFORMERS}
    models = [m for m in specs["models"] if m["name"] not in names]
    for m in models:
        if m["name"] in UNETS:
            unet = next(c for c in m["components"] if c["subfolder"] == "unet")
            unet.update({k: v for k, v in figures(UNETS[m["name"]]).items() if not k.startswith("_")})
    for name, arch, title in TRANSFORMERS:
        src = FULL_CONFIG_SOURCES[arch]
        fig = figures(arch)
        component = {"subfolder": src.subfolder, "budgets_gb": fig.pop("_commands"), **fig}
        models.append({"name": name, "title": title, "model_id": src.model_id, "zoo": arch,
                       "components": [component]})
    return dict(specs, models=models)


def _scalar(x: Any) -> bool:
    return not isinstance(x, (dict, list)) or (isinstance(x, list) and all(not isinstance(v, (dict, list)) for v in x))


def dumps(x: Any, depth: int = 0) -> str:
    """JSON as hub_specs.json has it: one-space indents, and lists of scalars and objects whose
    values are all scalars (or lists of them) on one line."""
    if _scalar(x) or (isinstance(x, dict) and all(_scalar(v) for v in x.values())):
        return json.dumps(x)
    pad = " " * (depth + 1)
    if isinstance(x, list):
        return "[\n" + ",\n".join(pad + dumps(v, depth + 1) for v in x) + "\n" + " " * depth + "]"
    items = ",\n".join(f"{pad}{json.dumps(k)}: {dumps(v, depth + 1)}" for k, v in x.items())
    return "{\n" + items + "\n" + " " * depth + "}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = parser.parse_args()
    current = PATH.read_text()
    text = dumps(updated(json.loads(current))) + "\n"
    if args.check:
        if text != current:
            print(f"{PATH} is out of date: run python recipes/hub_specs.py", file=sys.stderr)
            return 1
        return 0
    PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
