"""Loading the embedded default model's weights with the diffusers loader: seconds against the
1-second target, and the weights file's size against its 20 MB bar.

    python benchmarks/bench_load.py

The imports are warmed by a first load; the figure is the median of the next five loads.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from palette.models.default import WEIGHTS_DIR, load_unet  # noqa: E402

TARGET_S = 1.0
SIZE_BAR = 20 * 2**20


def main() -> None:
    load_unet()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        load_unet()
        times.append(time.perf_counter() - t)
    size = (WEIGHTS_DIR / "diffusion_pytorch_model.safetensors").stat().st_size
    median = statistics.median(times)
    print("| model | load s (median of 5) | target s | target / load | weights MB | bar MB |")
    print("|---|---|---|---|---|---|")
    print(f"| default UNet | {median:.3f} | {TARGET_S:.1f} | {TARGET_S / median:.1f}x | {size / 2**20:.1f} | "
          f"{SIZE_BAR / 2**20:.0f} |")


if __name__ == "__main__":
    main()
