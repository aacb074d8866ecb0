"""The `palette` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .cluster import Palette
from .palettize import palettize, target_layers
from .spec import PaletteSpec


def layer_table(model: torch.nn.Module, palettes: dict[str, Palette], original: dict) -> str:
    """One row per palettized layer: spec, stored size, bits per weight and weight SNR."""
    rows = [f"{'layer':<48} {'shape':<18} {'spec':<10} {'bytes':>9} {'bits/w':>6} {'SNR dB':>7}"]
    total_16 = total = 0
    for name, pal in palettes.items():
        ref = original[name].double()
        err = pal.dequantize().double() - ref
        snr = 10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum().clamp_min(1e-30)).item()
        shape = "x".join(map(str, pal.shape))
        rows.append(
            f"{name:<48} {shape:<18} {pal.spec.label:<10} {pal.nbytes:>9} "
            f"{pal.spec.bits_per_weight(pal.shape):>6.2f} {snr:>7.1f}"
        )
        total += pal.nbytes
        total_16 += 2 * ref.numel()
    rows.append(
        f"{len(palettes)} layers: {total_16 / 1e6:.2f} MB at fp16 -> {total / 1e6:.2f} MB "
        f"palettized ({total_16 / total:.1f}x smaller)"
    )
    return "\n".join(rows)


def cmd_demo(args: argparse.Namespace) -> int:
    from .models.minilm import load_minilm

    model, _ = load_minilm()
    spec = PaletteSpec(args.nbits, "per_grouped_channel", args.group_size)
    original = {n: m.weight.detach().clone() for n, m in target_layers(model).items()}
    t0 = time.perf_counter()
    palettes = palettize(model, spec)
    seconds = time.perf_counter() - t0
    print(f"all-MiniLM-L6-v2 (real pretrained weights), every target layer at {spec.label}:")
    print(layer_table(model, palettes, original))
    print(f"clustered {len(palettes)} layers exactly in {seconds:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palette",
        description="Mixed-bit k-means palettization of diffusion models for Core ML.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="palettize a built-in model and print what it costs")
    demo.add_argument("--nbits", type=int, default=4, choices=(1, 2, 3, 4, 6, 8))
    demo.add_argument("--group-size", type=int, default=16)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"palette: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
