"""What `make demo` measured: its figures as a results file, and the README's picture.

Run after `make demo` (which leaves runs/demo-prior/). Reads the evaluation's metrics.json and the classifier's
held-out accuracy, writes benchmarks/results/demo.md, and saves the last stage's sample grid (the most common
species conditioned from the kingdom down to the species, then other species) as docs/images/demo_coarse_to_fine.jpg.

    make demo && python benchmarks/demo.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from taxadiffusion.eval.report import SHORT, markdown_table, write_keeping_section

from common import REPO, RESULTS, save_sheet

RANKS = ("family", "genus", "specific_epithet")


def figures(metrics: dict) -> list[list[str]]:
    """The demo's table: per rank, accuracy (all, rare, common) and FID / KID / LPIPS."""
    rows = [["rank", "accuracy", "rare", "common", "FID", "KID", "LPIPS"]]
    for rank in RANKS:
        groups = metrics["ranks"][rank]
        accuracy = {group: groups.get(group, {}).get("accuracy", {}).get(rank) for group in ("all", "rare", "common")}
        scores = groups["all"]
        rows.append(
            [
                SHORT.get(rank, rank),
                *("–" if value is None else f"{value:.1%}" for value in accuracy.values()),
                f"{scores['fid']:.2f}",
                f"{scores['kid']:.4f}",
                f"{scores['lpips']:.4f}",
            ]
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo-prior", help="make demo's run folder")
    args = parser.parse_args(argv)
    metrics = json.loads((args.run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    settings = metrics["settings"]
    grids = sorted((args.run / "samples").glob("stage-*.png"))
    (REPO / "docs" / "images").mkdir(parents=True, exist_ok=True)
    picture = save_sheet(grids[-1], REPO / "docs" / "images" / "demo_coarse_to_fine.jpg")
    lines = [
        "# `make demo`: its figures",
        "",
        "Command: `make demo && python benchmarks/demo.py`. The published recipe adapting the shipped prior",
        "(`configs/demo_prior.yaml`) to the embedded synthetic taxonomy, scored by an oracle classifier.",
        f"{settings['per_taxon']} generated images per taxon, at most {settings['max_real_per_taxon']} real ones;",
        f"rare: fewer than {settings['rare_threshold']} training images (no family is rare).",
        "Accuracy: generated images that the oracle places in the conditioned taxon.",
        "",
        markdown_table(figures(metrics)),
        "",
        f"![the last stage's grid](../../{picture.relative_to(REPO)})",
        "",
    ]
    write_keeping_section(RESULTS / "demo.md", "\n".join(lines))
    print(f"wrote {RESULTS / 'demo.md'} and {picture}")


if __name__ == "__main__":
    main()
