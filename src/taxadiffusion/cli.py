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
from .options import from_args, given
from .stops import Terminated, run_command


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
    from .data.records import describe_unwritable

    report = check_images((r.image for r in records), workers=args.workers, progress=not args.json)
    awkward = records.unwritable_names()
    if args.json:
        print(json.dumps(report.to_dict() | ({"unwritable_names": awkward} if awkward else {})))
    else:
        print("\n".join([report.describe(), *describe_unwritable(awkward)]))
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
    if args.run != "prepare" and pretrain != (config.train.strategy == "prior"):
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

    trainer = Trainer(config, args.output, overwrite=args.overwrite)
    try:
        if trainer.accelerator.is_main_process:
            print(trainer.describe())
        if args.run == "prepare":  # screened, encoded and cached by every process: `train` starts at its first step
            trainer.release()
            return 0
        pipeline = trainer.run()
    except TrainingDiverged as error:
        print(f"taxadiffusion: training stopped: {error}", file=sys.stderr)
        return 3
    except (KeyboardInterrupt, Terminated) as stop:
        state = trainer.state
        stop.where = f"at step {state.step} of stage {state.stage} (the run resumes from its last checkpoint)"
        raise
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
    from .sampling import FAST, SamplingSettings

    chosen = given(args, SamplingSettings)
    chosen["window"] = tuple(chosen["window"]) if chosen["window"] else None
    if getattr(args, "fast", False):  # the preset, under the options given beside it
        return {**chosen, **{k: v for k, v in FAST.items() if chosen.get(k) is None}}
    return chosen


def cmd_sample(args: argparse.Namespace) -> int:
    from .devices import choose_device, sampling_dtype
    from .pipeline import TaxaDiffusionPipeline
    from .samples import check_counts, write_samples

    check_counts(args.n, args.batch_size)
    device = choose_device(args.device)
    pipe = TaxaDiffusionPipeline.from_pretrained(args.model, dtype=sampling_dtype(args.precision)).to(device)
    pipe.configure_sampling(**_sampling(args))
    lineage = pipe.resolve(args.taxon, args.rank)
    if args.condition_rank:
        lineage = lineage.down_to(args.condition_rank)
    paths = write_samples(pipe, lineage, args.n, args.out, args.seed, args.batch_size, args.overwrite)
    print(f"{args.n} images of {lineage} ({lineage.finest_rank}) written to {args.out}; grid: {paths[-1].name}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from . import generate as gen
    from .devices import choose_device, sampling_dtype
    from .fingerprint import generation_key
    from .pipeline import TaxaDiffusionPipeline
    from .saved_files import check_saved_folder
    from .text import TextEmbeddingCache

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_saved_folder(args.model, "a saved pipeline", "model_index.json", "train one with `taxadiffusion train`")
    taxonomy = TextEmbeddingCache.from_config(TextEmbeddingCache.load_config(args.model / "text_embeddings")).taxonomy
    options = ("per_taxon", "fill_to", "data", "root", "taxa", "rank", "seed")
    plan = gen.plan_request(taxonomy, **{name: getattr(args, name) for name in options})
    print(f"plan: {plan.describe()}; into {args.out}")
    if args.dry_run or not plan.items:
        return 0
    filtering = (args.filter, args.filter_rank, args.filter_threshold, args.filter_retries)
    image_filter = gen.ImageFilter.load(*filtering) if args.filter else None  # checked before the model loads
    state = PartialState()
    device = choose_device(args.device) if state.num_processes == 1 else state.device
    pipe = TaxaDiffusionPipeline.from_pretrained(args.model, dtype=sampling_dtype(args.precision)).to(device)
    pipe.configure_sampling(**_sampling(args))
    pipe.set_progress_bar_config(disable=True)
    key = generation_key(pipe, args.seed) | ({"filter": image_filter.describe()} if image_filter else {})
    if state.is_main_process:
        gen.claim_output(args.out, key, args.add)
    state.wait_for_everyone()
    result, rows = gen.generate_sharded(pipe, plan, args.out, key, args.batch_size, image_filter)
    if state.is_main_process:
        print(gen.done_line(result, rows, args.out))
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
    from .eval.protocol import EvalInputs, evaluate
    from .eval.report import summary_lines
    from .eval.settings import EvalSettings

    device = choose_device(args.device)  # checked before any data or weights load
    settings = from_args(EvalSettings, args)
    inputs = EvalInputs(
        data=tuple(args.data),
        model=args.model,
        images=args.images,
        root=args.root,
        split=args.split,
        zero_shot=args.zero_shot,
        sampling_changes=_sampling(args),
        precision=args.precision or "fp32",
    )
    metrics = evaluate(inputs, args.out, settings, device, regenerate=args.regenerate)
    if os.environ.get("RANK", "0") != "0":  # one of several processes (accelerate launch): the main one reports
        return 0
    print(summary_lines(metrics))
    print(f"report: {Path(args.out) / 'report.md'} and {Path(args.out) / 'report.html'}")
    return 0


def cmd_classifier_train(args: argparse.Namespace) -> int:
    from .eval.classifier import train_on_records, train_synthetic_oracle
    from .eval.settings import ClassifierTraining
    from .saved_files import refuse_nonempty

    refuse_nonempty(args.out, args.overwrite)  # before the training, not after
    common = from_args(ClassifierTraining, args)
    if args.synthetic:
        from .data.synthetic import SyntheticConfig

        run = train_synthetic_oracle(SyntheticConfig(seed=args.synthetic_seed), args.per_species, common)
    elif args.data:
        from .data.readers import read_records
        from .eval.classifier import train_with_generated
        from .eval.settings import GeneratedRecipe

        records = read_records(args.data[0], args.data[1], root=args.root)
        records = records.split(args.split) if args.split else records
        if args.generated:
            generated = read_records(*args.generated)
            recipe = from_args(GeneratedRecipe, args)
            run = train_with_generated(records, generated, args.holdout, common, recipe)
        else:
            run = train_on_records(records, args.holdout, common)
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
    launch(args.model, port=args.port, host=args.host, device=choose_device(args.device), precision=args.precision)
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
    "prepare": cmd_train,
    "sample": cmd_sample,
    "generate": cmd_generate,
    "evaluate": cmd_evaluate,
    "classifier train": cmd_classifier_train,
    "app": cmd_app,
    "taxonomy resolve": cmd_taxonomy_resolve,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(COMMANDS[args.run], args)  # errors, interrupts and full disks as one line (stops.py)


if __name__ == "__main__":
    sys.exit(main())
