"""The `taxadiffusion` command. Thin: each command parses its arguments, calls one library function, prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli_parser import build_parser
from .errors import TaxaDiffusionError


class CommandError(TaxaDiffusionError):
    """A failure whose message tells the user what to do; printed without a traceback."""


# -- data ------------------------------------------------------------------------------------------


def _read(args: argparse.Namespace):
    from .data.readers import read_records

    return read_records(args.format, args.path, root=args.root, resolve=args.resolve_taxonomy)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from .data.records import describe_summary

    summary = _read(args).summary()
    print(json.dumps(summary) if args.json else describe_summary(summary, f"{args.format} dataset at {args.path}"))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data.check import check_images

    records = _read(args)
    if not records.records:
        raise CommandError(f"{args.path} holds no images to check (is --format {args.format} the right reader?)")
    report = check_images((r.image for r in records), workers=args.workers, progress=not args.json)
    print(json.dumps(report.to_dict()) if args.json else report.describe())
    return 1 if report.unusable else 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import SyntheticConfig, SyntheticTaxonomy

    synthetic = SyntheticTaxonomy(SyntheticConfig(seed=args.seed, resolution=args.resolution))
    if args.out:
        synthetic.write_folder(args.out, overwrite=args.overwrite, progress=not args.json)
    summary = synthetic.summary() | ({"folder": str(args.out)} if args.out else {})
    print(json.dumps(summary) if args.json else synthetic.describe(args.out))
    return 0


# -- train, sample, evaluate -----------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .config import Config

    config = Config.load(args.config, args.set)
    pretrain = args.run == "pretrain"
    if pretrain != (config.train.strategy == "prior"):
        raise CommandError(
            f"{args.config}: `pretrain` makes a prior (train.strategy: prior), `train` adapts one"
            if pretrain
            else f"{args.config} makes a prior (train.strategy: prior): run it with `taxadiffusion pretrain`"
        )
    if args.dry_run:
        from .train.plan import dry_run_report

        print(dry_run_report(config, Path(args.output)))
        return 0
    from .train.trainer import Trainer, TrainingDiverged

    try:
        trainer = Trainer(config, args.output, overwrite=args.overwrite)
        if trainer.accelerator.is_main_process:
            print(trainer.describe())
        pipeline = trainer.run()
    except TrainingDiverged as error:
        print(f"taxadiffusion: training stopped: {error}", file=sys.stderr)
        return 3
    took = f"{trainer.state.train_seconds / 60:.1f} min of training, over every process that ran or resumed it"
    if pretrain:
        print(f"done ({took}): the prior is the base folder {pipeline}; adapt it with --set model.base={pipeline}")
        if args.pack:
            from .prior import pack_prior, prior_recipe

            packed = pack_prior(pipeline, args.pack, prior_recipe(args.config, args.set), args.pack_precision)
            print(f"packed into {packed} ({packed.stat().st_size / 2**20:.1f} MB)")
    else:
        print(f"done ({took}): pipeline saved to {pipeline}; sample grids in {Path(args.output) / 'samples'}")
    return 0


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling options given on the command line (None: the pipeline's saved setting); `--fast` fills in the
    fast preset's."""
    from .sampling import FAST

    window = tuple(args.window) if args.window else None
    given = dict(
        scheduler=args.scheduler,
        steps=args.steps,
        guidance=args.guidance,
        scale=args.scale,
        window=window,
        negative=args.negative,
        spacing=args.spacing,
    )
    if getattr(args, "fast", False):  # the preset, under the options given beside it
        return {**given, **{k: v for k, v in FAST.items() if given.get(k) is None}}
    return given


def cmd_sample(args: argparse.Namespace) -> int:
    from .devices import choose_device
    from .pipeline import TaxaDiffusionPipeline
    from .samples import check_counts, write_samples

    check_counts(args.n, args.batch_size)
    device = choose_device(args.device)
    pipe = TaxaDiffusionPipeline.from_pretrained(args.model).to(device)
    pipe.configure_sampling(**_sampling(args))
    lineage = pipe.resolve(args.taxon, args.rank)
    if args.condition_rank:
        lineage = lineage.down_to(args.condition_rank)
    paths = write_samples(pipe, lineage, args.n, args.out, args.seed, args.batch_size, args.overwrite)
    print(f"{args.n} images of {lineage} ({lineage.finest_rank}) written to {args.out}; grid: {paths[-1].name}")
    return 0


def _generation_plan(args: argparse.Namespace, taxonomy):
    """The images `generate` makes, from --per-taxon / --fill-to / --taxa."""
    from . import generate as gen

    if args.fill_to is not None:
        if not args.data:
            raise CommandError("--fill-to counts the real images of a dataset: give --data FORMAT PATH")
        from .data.readers import read_records

        real = read_records(args.data[0], args.data[1], root=args.root)
        if tuple(real.ranks) != tuple(taxonomy.ranks):
            raise CommandError(f"--data has ranks {', '.join(real.ranks)}; the model {', '.join(taxonomy.ranks)}")
        lineages = [record.lineage for record in real]
        return gen.plan_fill_to(taxonomy, args.fill_to, lineages, args.seed, source=args.data[1])
    if args.taxa is not None:
        from .resolver import read_names_file

        lines = read_names_file(args.taxa)
        return gen.plan_taxa(taxonomy, lines, args.per_taxon or 10, args.seed, source=str(args.taxa))
    if args.per_taxon is None:
        raise CommandError("say what to generate: --per-taxon N, --fill-to N --data FORMAT PATH, or --taxa FILE")
    return gen.plan_per_taxon(taxonomy, args.per_taxon, args.rank, args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from accelerate import PartialState

    from . import generate as gen
    from .devices import choose_device
    from .eval.protocol import generation_key
    from .pipeline import TaxaDiffusionPipeline
    from .saved_files import check_saved_folder
    from .text import TextEmbeddingCache

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_saved_folder(args.model, "a saved pipeline", "model_index.json", "train one with `taxadiffusion train`")
    taxonomy = TextEmbeddingCache.from_config(TextEmbeddingCache.load_config(args.model / "text_embeddings")).taxonomy
    plan = _generation_plan(args, taxonomy)
    print(f"plan: {plan.describe()}; into {args.out}")
    if args.dry_run or not plan.items:
        return 0
    state = PartialState()
    device = choose_device(args.device) if state.num_processes == 1 else state.device
    pipe = TaxaDiffusionPipeline.from_pretrained(args.model).to(device)
    pipe.configure_sampling(**_sampling(args))
    pipe.set_progress_bar_config(disable=True)
    key = generation_key(pipe, args.seed)
    if state.is_main_process:
        gen.claim_output(args.out, key, args.add)
    state.wait_for_everyone()
    single = state.num_processes == 1

    begun, said = time.perf_counter(), []

    def on_batch(done: int) -> None:  # the plan's estimated time, from the first batch
        if not said and state.is_main_process:
            said.append(True)
            per_image = (time.perf_counter() - begun) / done
            from tqdm.auto import tqdm

            tqdm.write(f"estimated: {gen.estimate(per_image, len(plan.items) // state.num_processes)} in all")

    result = gen.generate(
        pipe,
        plan,
        args.out,
        key,
        batch_size=args.batch_size,
        shard=(state.process_index, state.num_processes),
        write_table=single,
        progress=state.is_main_process,
        on_batch=on_batch,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        rows = result.rows if single else gen.write_metadata(args.out, taxonomy, plan, gen.generation_tag(key), key)
        print(
            "done: "
            + (
                f"{result.written:,} images made ({result.images_per_second:.2f} images/s)"
                if result.written
                else "no image left to make"
            )
            + f", {result.existing:,} already there; {args.out / gen.METADATA_FILE} lists {rows:,} images"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.compare:
        from .eval.report import compare

        count, md, html = compare(args.compare, args.out)
        print(f"compared {count} runs: {md} and {html}")
        return 0
    if not args.data:
        raise CommandError("--data FORMAT PATH is required (the real images to compare with)")
    from .devices import choose_device
    from .eval.protocol import EvalSettings, evaluate
    from .eval.report import summary_lines

    device = choose_device(args.device) if args.model else "cpu"  # checked before any data or weights load
    settings = EvalSettings(
        ranks=tuple(r.strip() for r in args.ranks.split(",")),
        per_taxon=args.per_taxon,
        max_real_per_taxon=args.max_real,
        resolution=args.resolution,
        seed=args.seed,
        batch_size=args.batch_size,
        lpips_net=args.lpips_net,
        protocol=args.protocol,
        rare_threshold=args.rare_threshold,
        inception=args.inception,
        classifier=str(args.classifier) if args.classifier else None,
        bioclip=args.bioclip,
        bioclip_tokenizer=args.bioclip_tokenizer,
    )
    metrics = evaluate(
        tuple(args.data), args.out, settings, args.model, args.images, args.root, args.split, device, args.regenerate,
        sampling_changes=_sampling(args), zero_shot=args.zero_shot,
    )  # fmt: skip
    print(summary_lines(metrics))
    print(f"report: {Path(args.out) / 'report.md'} and {Path(args.out) / 'report.html'}")
    return 0


def cmd_classifier_train(args: argparse.Namespace) -> int:
    from .eval.classifier import ClassifierTraining, train_on_records, train_synthetic_oracle
    from .saved_files import refuse_nonempty

    refuse_nonempty(args.out, args.overwrite)  # before the training, not after
    common = ClassifierTraining(args.steps, args.resolution, args.width, args.batch_size)
    if args.synthetic:
        from .data.synthetic import SyntheticConfig

        run = train_synthetic_oracle(SyntheticConfig(seed=args.synthetic_seed), args.per_species, common)
    elif args.data:
        from .data.readers import read_records

        records = read_records(args.data[0], args.data[1], root=args.root)
        run = train_on_records(records.split(args.split) if args.split else records, args.holdout, common)
    else:
        raise CommandError("give --data FORMAT PATH or --synthetic")
    run.save(args.out, overwrite=True)
    print(f"classifier saved to {args.out}; {run.describe()}")
    return 0


# -- app, taxonomy ---------------------------------------------------------------------------------


def cmd_app(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .devices import choose_device

    try:
        from .app import launch
    except ImportError as error:
        raise CommandError(f"the app needs gradio ({error}); pip install 'taxadiffusion[app]'") from None
    launch(args.model, port=args.port, host=args.host, device=choose_device(args.device))
    return 0


def cmd_taxonomy_resolve(args: argparse.Namespace) -> int:
    from .resolver import LineageResolver, check_table_target, read_names_file, resolutions_json, write_lineage_table

    names = list(args.names) + (read_names_file(args.file) if args.file else [])
    if not names:
        raise CommandError("give species or genus names, or --file with one name per line")
    if args.csv:
        check_table_target(args.csv, args.overwrite)  # before the lookup
    results = LineageResolver().resolve_many(names)
    print(json.dumps(resolutions_json(results)) if args.json else "\n".join(r.message() for r in results))
    if args.csv:
        write_lineage_table(results, args.csv, args.overwrite)
    failed = [r for r in results if r.status != "resolved"]
    if failed:
        counts = {s: sum(r.status == s for r in failed) for s in ("ambiguous", "unknown")}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        resolved = f"{len(results) - len(failed)} of {len(results)} names resolved"
        print(f"taxadiffusion: {resolved}; {summary}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {
    "data inspect": cmd_data_inspect,
    "data check": cmd_data_check,
    "data synth": cmd_data_synth,
    "train": cmd_train,
    "pretrain": cmd_train,
    "sample": cmd_sample,
    "generate": cmd_generate,
    "evaluate": cmd_evaluate,
    "classifier train": cmd_classifier_train,
    "app": cmd_app,
    "taxonomy resolve": cmd_taxonomy_resolve,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.run](args)
    except TaxaDiffusionError as error:  # anything else is a bug, and keeps its traceback
        print(f"taxadiffusion: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
