"""Caption following of the default model, judged by the caption checker, on the held-out captions
(whole attribute combinations never seen in training). Prints only; writes nothing.

    python -m palette.models.evaluate            # trained vs random weights vs chance
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from palette.models.checker import chance, score
from palette.models.data import Scene, split_scenes
from palette.models.default import DefaultPipeline, load_default, make_unet


def caption_following(
    pipeline: DefaultPipeline, scenes: list[Scene] | None = None, steps: int = 20, seed: int = 0
) -> dict[str, float]:
    """Sample one image per caption (all held-out captions by default) and score it with the checker:
    the fraction right per attribute, ``shape+colour`` (both right) and ``all``."""
    scenes = list(scenes if scenes is not None else split_scenes()[1])
    images = pipeline([s.caption for s in scenes], steps=steps, seed=seed)
    return score(images, scenes)


def random_weights(pipeline: DefaultPipeline, seed: int = 0) -> DefaultPipeline:
    """The same pipeline with a freshly initialised UNet of the same architecture."""
    return dataclasses.replace(pipeline, unet=make_unet(seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = load_default()
    n = len(split_scenes()[1])
    rows = {
        "trained": caption_following(pipe, steps=args.steps, seed=args.seed),
        "random weights": caption_following(random_weights(pipe), steps=args.steps, seed=args.seed),
        "chance": chance(),
    }
    keys = list(rows["chance"])
    print(f"caption following on {n} held-out captions, {args.steps} steps, seed {args.seed}")
    print(f"{'':16s}" + "".join(f"{k:>14s}" for k in keys))
    for name, res in rows.items():
        print(f"{name:16s}" + "".join(f"{100 * res[k]:13.1f}%" for k in keys))


if __name__ == "__main__":
    main()
