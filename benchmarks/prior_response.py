"""Does a prior's cross-attention respond to its captions? Images of the same seeds under different captions
against images of different seeds under one caption: a prior whose text path is dead gives a ratio near 0.

    python benchmarks/prior_response.py --prior runs/prior-demo [--captions 8 --seeds 8]
    python benchmarks/prior_response.py --prior benchmarks/priors/birds525.safetensors \
        --pattern ", .*, " --name prior_response_birds525      # the binomial captions (two commas) only

Writes benchmarks/results/<name>.json (and <name>.jpg, a sample sheet: one row per caption, same seeds per column).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path

import numpy as np
import torch

from taxadiffusion.grid import image_grid
from taxadiffusion.pipeline import TaxaDiffusionPipeline
from taxadiffusion.prior import read_prior, resolve_base

from common import RESULTS


def measure(
    base: str, n_captions: int, n_seeds: int, guidance: str, scale: float, pattern: str = "", captions_of: str = ""
) -> tuple[dict, list]:
    """`captions_of`: take the captions from this prior's record instead (to follow one set of captions along a
    prior's checkpoints, or from a prior that never saw them)."""
    info = read_prior(captions_of or base)
    known = [c for c in info.captions if re.search(pattern, c)]  # the most frequent captions that match
    captions = sorted(known, key=lambda c: (-info.captions[c], c))[:n_captions]
    pipe = TaxaDiffusionPipeline.from_prior(base, captions)
    images = []
    for caption in captions:
        generators = [torch.Generator().manual_seed(seed) for seed in range(n_seeds)]
        images.append(
            pipe(
                [caption] * n_seeds, guidance=guidance, guidance_scale=scale, generator=generators, output_type="np"
            ).images.astype(np.float64)
        )
    stack = np.stack(images)  # (captions, seeds, H, W, 3) in [0, 1]
    across_captions = np.mean(
        [np.abs(stack[a] - stack[b]).mean() for a, b in itertools.combinations(range(len(captions)), 2)]
    )
    across_seeds = np.mean(
        [np.abs(stack[:, a] - stack[:, b]).mean() for a, b in itertools.combinations(range(n_seeds), 2)]
    )
    result = {
        "prior": base,
        "captions": captions,
        "seeds": n_seeds,
        "guidance": guidance,
        "scale": scale,
        "captions_in_training": len(info.captions),
        "pattern": pattern,
        "matching_captions": len(known),
        "mean_abs_difference_same_seed_other_caption": float(across_captions),
        "mean_abs_difference_same_caption_other_seed": float(across_seeds),
        "ratio": float(across_captions / across_seeds),
    }
    return result, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", default="packaged:demo", help="a base folder made by pretrain, or packaged:NAME")
    parser.add_argument("--captions", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--guidance", default="vanilla")
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--pattern", default="", help="a regular expression the captions must match (default: any)")
    parser.add_argument("--name", default="prior_response", help="the result files' name")
    parser.add_argument("--captions-of", default="", help="take the captions from this prior's record")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    base = resolve_base(args.prior)
    captions_of = resolve_base(args.captions_of) if args.captions_of else ""
    result, images = measure(base, args.captions, args.seeds, args.guidance, args.scale, args.pattern, captions_of)
    result["prior"] = args.prior
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    from PIL import Image

    tiles = [Image.fromarray((image * 255).round().astype(np.uint8)) for row in images for image in row]
    sheet = image_grid(tiles, columns=args.seeds, labels=result["captions"]).convert("RGB")
    sheet.save(args.out / f"{args.name}.jpg", "JPEG", quality=90, optimize=True)  # a sheet to look at: JPEG
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
