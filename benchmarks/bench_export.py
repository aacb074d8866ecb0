"""Export figures on the default model's UNet: Core ML stored bytes against the recipe's predicted
bytes, the safetensors palettes file against the palettes' bytes, and chunked exports.

    python benchmarks/bench_export.py

Each Core ML export is verified (every palettized weight read back and compared bit for bit), so
the bytes printed are what the package holds. Chunks: the same package split under limits of the
total weight bytes / 1.6 and / 2.6.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from palette import PaletteSpec, Recipe, target_layers  # noqa: E402
from palette.export import chunk_mlpackage, export_coreml, export_palettes  # noqa: E402
from palette.models.default import load_unet  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def grouped(nbits: int, **kw) -> dict[str, PaletteSpec]:
    """`nbits` per_grouped_channel g16 where 16 divides the output channels, per_tensor elsewhere."""
    unet = load_unet()
    return {n: PaletteSpec(nbits, "per_grouped_channel", 16, **kw) if m.weight.shape[0] % 16 == 0
            else PaletteSpec(nbits, **kw) for n, m in target_layers(unet).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    unet = load_unet()
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen),
              torch.tensor([500.0]), torch.randn(1, 16, cfg.cross_attention_dim, generator=gen))
    cases = {
        "4-bit g16": Recipe.from_specs(unet, grouped(4)),
        "4-bit g16, per-channel scale": Recipe.from_specs(unet, grouped(4, per_channel_scale=True)),
        "2-bit g16": Recipe.from_specs(unet, grouped(2)),
        "recipes/default_3bit.json": Recipe.load(REPO / "recipes" / "default_3bit.json"),
    }
    print("| recipe | layers | Core ML stored palettized B | predicted B | stored / predicted | "
          "safetensors file B | palettes B | file / palettes | convert + verify s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, recipe in cases.items():
            t0 = time.perf_counter()
            report = export_coreml(unet, Path(tmp) / "unet.mlpackage", inputs, recipe)
            seconds = time.perf_counter() - t0
            palettes = recipe.palettes(unet)
            file_bytes = export_palettes(palettes, Path(tmp) / "palettes.safetensors")
            nbytes = sum(p.nbytes for p in palettes.values())
            print(f"| {label} | {report.n_palettized} | {report.stored_palettized_bytes:,} | "
                  f"{report.predicted_palettized_bytes:,} | {report.size_ratio:.4f} | {file_bytes:,} | {nbytes:,} | "
                  f"{file_bytes / nbytes:.4f} | {seconds:.0f} |", flush=True)
            if label == "4-bit g16":
                total = report.weight_file_bytes
                chunks = []
                for div in (1.6, 2.6):
                    limit = int(total / div)
                    m = chunk_mlpackage(report.path, Path(tmp) / f"chunks{div}", limit)
                    chunks.append(f"| total / {div} = {limit:,} | {len(m.chunks)} | "
                                  f"{' / '.join(f'{c.weight_bytes:,}' for c in m.chunks)} |")
    print(f"\nchunked export of the 4-bit g16 package ({total:,} B of weights), verified:")
    print("| limit (B) | chunks | weight bytes per chunk |\n|---|---|---|")
    print("\n".join(chunks))


if __name__ == "__main__":
    main()
