"""How faithfully does a prior draw its own synthetic taxonomy when its caption says the look? An oracle trained on
the prior's taxonomy scores the prior's samples per rank, each prompted with the caption that taxon's training
images had. That is the accuracy a frozen UNet can reach when its text states everything: the ceiling the
adaptation's rank encoders work under, since from stage 1 on they are all that changes.

    python benchmarks/prior_fidelity.py --config configs/prior_demo.yaml --prior packaged:demo \
        [--unet-from runs/demo-prior/pipeline ...]

`--unet-from` measures an adapted pipeline's UNet (the prior plus its stage-0 LoRA) under the same captions: what
the adaptation's one change to the UNet does to its drawing. Writes benchmarks/results/prior_fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from taxadiffusion.config import Config
from taxadiffusion.data.synthetic import SyntheticTaxonomy, appearance
from taxadiffusion.eval.classifier import (
    ClassifierTraining,
    TaxonClassifier,
    accuracy_by_rank,
    to_unit,
    train_synthetic_oracle,
)
from taxadiffusion.guidance import Guidance
from taxadiffusion.pipeline import TaxaDiffusionPipeline

from common import RESULTS


def oracle(config: Config, folder: Path, steps: int) -> TaxonClassifier:
    """The prior's taxonomy's oracle, trained once into `folder` (reused when it is there)."""
    if not (folder / "config.json").is_file():
        run = train_synthetic_oracle(config.data.synthetic, per_species=60, training=ClassifierTraining(steps=steps))
        print(run.describe())
        run.save(folder, overwrite=True)
    return TaxonClassifier.from_pretrained(str(folder)).eval()


def fidelity(pipe, synth: SyntheticTaxonomy, captions: list[str], classifier, per_taxon: int, scale: float, steps: int):
    """Per-rank oracle accuracy of `per_taxon` samples of every species under its own caption (`captions`, one per
    species; seeds fixed by species and image, so every UNet measured draws from the same noise)."""
    predicted, truth = [], []
    for species, caption in zip(synth.species, captions, strict=True):
        generators = [torch.Generator().manual_seed(1000 * species.index + k) for k in range(per_taxon)]
        images = pipe(
            [caption] * per_taxon,
            guidance="vanilla",
            guidance_scale=scale,
            num_inference_steps=steps,
            generator=generators,
            output_type="np",
        ).images
        predicted.append(classifier.predict(to_unit((images * 255).round().astype(np.uint8))))
        truth += [classifier.taxonomy.ids(species.lineage)] * per_taxon
    by_rank = accuracy_by_rank(torch.cat(predicted), torch.tensor(truth))
    return dict(zip((r.value for r in classifier.taxonomy.ranks), by_rank, strict=True))


@torch.no_grad()
def condition_norms(pipe) -> dict[str, float]:
    """Mean L2 norm of the condition's tokens (c_k, the rank encoders' sum) at each depth, over every species of
    an adapted pipeline, as its sampling encodes them (`encode`): what its frozen UNet reads, to compare with the
    prior's caption features."""
    taxonomy = pipe.taxonomy
    species = [taxonomy.lineage(t) for t in taxonomy.leaves() if t.level == len(taxonomy.ranks) - 1]
    norms = {}
    for depth, rank in enumerate(taxonomy.ranks, 1):
        condition, _ = pipe.encode([lineage.truncate(depth) for lineage in species], Guidance.NONE, 1)
        norms[rank.value] = float(condition.norm(dim=-1).mean())
    return norms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/prior_demo.yaml", help="the config the prior was made by")
    parser.add_argument("--prior", default="packaged:demo", help="a base folder made by pretrain, or packaged:NAME")
    parser.add_argument("--unet-from", nargs="*", default=[], help="adapted pipelines whose UNet to measure too")
    parser.add_argument("--per-taxon", type=int, default=4, help="samples per species")
    parser.add_argument("--scale", type=float, default=3.0, help="vanilla CFG scale (the prior's own guidance)")
    parser.add_argument("--steps", type=int, default=8, help="DPM-Solver++ steps, as the demo samples")
    parser.add_argument("--oracle", type=Path, default=Path("runs/prior-fidelity-oracle"))
    parser.add_argument("--oracle-steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS / "prior_fidelity.json")
    args = parser.parse_args(argv)

    config = Config.load(args.config)
    if config.data.format != "synthetic" or not config.caption.describes:
        parser.error(f"{args.config}: a prior of the synthetic taxonomy whose captions describe each look")
    synth = SyntheticTaxonomy(config.data.synthetic)
    classifier = oracle(config, args.oracle, args.oracle_steps)
    captions = [config.caption.caption(s.lineage, appearance(s.traits)) for s in synth.species]
    pipe = TaxaDiffusionPipeline.from_prior(args.prior, sorted(set(captions)), scheduler="dpm")
    rows, norms = {}, {args.prior: float(pipe.text_embeddings.table(0).norm(dim=-1).mean())}
    for unet_from in [None, *args.unet_from]:
        if unet_from is not None:  # the adapted UNet (its LoRA loaded as the pipeline loads it), same captions
            adapted = TaxaDiffusionPipeline.from_pretrained(unet_from)
            pipe.unet, norms[unet_from] = adapted.unet.eval(), condition_norms(adapted)
        name, start = unet_from or args.prior, time.perf_counter()
        rows[name] = fidelity(pipe, synth, captions, classifier, args.per_taxon, args.scale, args.steps)
        print(name, json.dumps(rows[name]), f"{time.perf_counter() - start:.0f} s")
    held_out = json.loads((args.oracle / "heldout_accuracy.json").read_text())["accuracy"]
    result = {
        "config": args.config,
        "prior": args.prior,
        "species": len(synth.species),
        "per_taxon": args.per_taxon,
        "guidance": f"vanilla, scale {args.scale}, DPM-Solver++ {args.steps} steps",
        "oracle_held_out_accuracy": held_out,
        "accuracy": rows,
        # the prior's caption features, and each adapted pipeline's condition per depth (mean token L2 norm)
        "text_token_norm": norms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
