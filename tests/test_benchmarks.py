"""The benchmarks' bookkeeping that results depend on (their measurements run in benchmarks/, not here)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OLD_PRIOR = "benchmarks/priors/birds_fish.safetensors"


def load_benchmark(monkeypatch, name: str):
    """benchmarks/NAME.py as a module (benchmarks import their siblings, e.g. common.py, from their own folder)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def table1(monkeypatch):
    return load_benchmark(monkeypatch, "table1")


def evaluated(scale: float, ranks: list[str], fid: float) -> dict:
    """A row's metrics.json as the evaluation writes it, cut to what the record's bookkeeping reads."""
    settings = {"ranks": ranks, "per_taxon": 10, "scale": scale, "window": [0.0, 1.0]}
    return {"settings": settings, "ranks": {rank: {"all": {"fid": fid}} for rank in ranks}}


def test_table1_keeps_its_rows_to_one_prior_and_archives_them_before_another(table1, tmp_path, monkeypatch):
    """Table 1's rows are all adapted from the record's prior: a Table 1 run on another prior stops before it
    trains, until `--archive NAME` has moved the rows to the investigations as <row>~NAME with that prior and a
    command that measures each again; the investigations run against that prior get it explicitly too."""
    every = list(table1.RANKS)
    results = tmp_path / "quality_cub"
    results.mkdir()
    scale_5 = (
        "python benchmarks/table1.py --dataset cub --rows taxadiffusion --scale 5 --variant scale-5 "
        "--ranks specific_epithet"
    )
    record = {
        "flat": evaluated(3.0, every, 220.0),
        "taxadiffusion": evaluated(3.0, every, 210.0),
        "taxadiffusion-vanilla": evaluated(3.0, every, 200.0),
        "train_seconds": {"flat": 60.0, "taxadiffusion": 90.0},
        "investigations": {
            "taxadiffusion~scale-5": {
                **evaluated(5.0, ["specific_epithet"], 205.0),
                "investigation": {"row": "taxadiffusion", "set": [], "scale": 5.0, "command": scale_5},
            }
        },
        "prior": OLD_PRIOR,
    }
    (results / "metrics.json").write_text(json.dumps(record))
    for sheet in ("samples_flat_specific_epithet.jpg", "samples_taxadiffusion-vanilla_order.jpg"):
        (results / sheet).write_bytes(b"png")
    (results / "generated" / "flat").mkdir(parents=True)  # the flat row's export, from the old prior

    # the dataset's Table 1 prior changes: its rows must be archived before Table 1 runs on it
    cub = table1.DATASETS["cub"]
    monkeypatch.setitem(table1.DATASETS, "cub", cub._replace(prior="birds_fish_long"))
    args = table1.parse_args(["--dataset", "cub", "--results", str(tmp_path)])
    assert table1.relative(args.prior) == "benchmarks/priors/birds_fish_long.safetensors" and not args.other_prior
    with pytest.raises(SystemExit, match=f"adapted from {OLD_PRIOR}.*--archive prior-birds_fish"):
        table1.refuse_another_prior(table1.read_record(results), args)
    with pytest.raises(SystemExit):  # archiving is all that --archive does
        table1.parse_args(["--dataset", "cub", "--archive", "old", "--rows", "flat", "--variant", "x"])

    assert table1.main(["--dataset", "cub", "--archive", "prior-5000", "--results", str(tmp_path)]) == 0
    kept = table1.read_record(results)
    assert "prior" not in kept and not table1.table_rows(kept)
    archived = ["flat~prior-5000", "taxadiffusion~prior-5000", "taxadiffusion-vanilla~prior-5000"]
    assert list(kept["investigations"]) == [*archived, "taxadiffusion~scale-5"]
    assert kept["train_seconds"] == {"flat~prior-5000": 60.0, "taxadiffusion~prior-5000": 90.0}
    for name in archived:
        run = kept["investigations"][name]
        assert run["ranks"] == record[name.split("~")[0]]["ranks"]
        assert run["investigation"]["prior"] == OLD_PRIOR and run["investigation"]["set"] == []
    table1.refuse_another_prior(kept, args)  # Table 1 may now run on the new prior
    sheets = sorted(path.name for path in results.glob("samples_*"))  # each archived row's sheets go with it
    assert sheets == [
        "samples_flat~prior-5000_specific_epithet.jpg",
        "samples_taxadiffusion-vanilla~prior-5000_order.jpg",
    ]

    # each archived row's command measures it again: from the old prior, as an investigation, at every rank
    again = table1.parse_args(
        kept["investigations"]["taxadiffusion-vanilla~prior-5000"]["investigation"]["command"].split()[2:]
    )
    assert again.rows == ["taxadiffusion-vanilla"] and again.variant == "prior-5000" and again.scale == 3.0
    assert table1.relative(again.prior) == OLD_PRIOR and again.other_prior and again.ranks == every
    scale = kept["investigations"]["taxadiffusion~scale-5"]["investigation"]
    assert scale["prior"] == OLD_PRIOR and scale["command"] == scale_5.replace(
        "--variant scale-5", f"--variant scale-5 --prior {OLD_PRIOR}"
    )
    again = table1.parse_args(scale["command"].split()[2:])
    assert table1.relative(again.prior) == OLD_PRIOR and again.scale == 5.0 and again.ranks == ["specific_epithet"]

    # a row measured on the new prior elsewhere, its record brought here: the tables are written from it alone,
    # the investigations in one table per set of ranks
    kept["taxadiffusion"] = evaluated(3.0, every, 190.0)
    kept["prior"] = "benchmarks/priors/birds_fish_long.safetensors"
    (results / "metrics.json").write_text(json.dumps(kept))
    (results / "samples_taxadiffusion_specific_epithet.jpg").write_bytes(b"png")
    (results / "generated" / "taxadiffusion").mkdir()
    (results / "classifier").mkdir()
    (results / "classifier" / "heldout_accuracy.json").write_text(json.dumps({"accuracy": {"genus": 0.9}}))
    assert table1.main(["--dataset", "cub", "--tables", "--results", str(tmp_path)]) == 0
    md = (tmp_path / "quality_cub.md").read_text()
    assert "Prior: `benchmarks/priors/birds_fish_long.safetensors` (`configs/prior_birds_fish_long.yaml`)" in md
    table, investigations = md.split("## Investigations")
    assert "| taxadiffusion | 190.00 |" in table and "prior-5000" not in table
    assert "At order, family, genus, species:" in investigations and "At species:" in investigations
    assert "| taxadiffusion~prior-5000 | 210.00 |" in investigations
    # the samples and exports listed are the table's rows'; the archived rows' sheets are linked apart
    samples = md.split("## Samples")[1]
    assert (
        "![samples_taxadiffusion_specific_epithet](quality_cub/samples_taxadiffusion_specific_epithet.jpg)" in samples
    )
    assert "Archived rows' sheets: [samples_flat~prior-5000_specific_epithet]" in samples
    assert "The species-rank images of taxadiffusion are in" in samples  # not the old prior's flat export


def test_table1_refuses_an_investigation_name_that_the_record_holds_for_another_change(table1, tmp_path):
    """`--variant NAME` keys the record's <row>~NAME: a run changing the row otherwise (another prior, --set or
    ranks) would replace that result, so it stops and names both commands; the same command again goes on."""
    results = tmp_path / "quality_cub"
    old = (
        f"python benchmarks/table1.py --dataset cub --rows taxadiffusion --variant unet-all --prior {OLD_PRIOR} "
        "--set train.unet_stages=all --ranks specific_epithet"
    )
    what = {"row": "taxadiffusion", "set": ["train.unet_stages=all"], "scale": 3.0, "command": old, "prior": OLD_PRIOR}
    record = {"investigations": {"taxadiffusion~unet-all": {**evaluated(3.0, ["specific_epithet"], 150.0),
                                                            "investigation": what}}}  # fmt: skip
    table1.keep_record(results, record)
    kept = table1.read_record(results)

    def check(argv: list[str]) -> None:
        args = table1.parse_args(["--dataset", "cub", "--results", str(tmp_path), *argv])
        table1.refuse_another_investigation(kept, args, results)

    again = old.split()[2:]
    check(again)  # the recorded command itself resumes
    check(["--rows", "taxadiffusion", "--variant", "other", "--set", "train.unet_stages=all"])  # a name of its own
    changed = {
        "the dataset's prior": [a for a in again if a not in ("--prior", OLD_PRIOR)],
        "another --set": [a.replace("unet_stages=all", "unet_stages=first") for a in again],
        "more ranks": again[: again.index("--ranks")],
        "another scale": [*again, "--scale", "5"],
    }
    for why, argv in changed.items():
        with pytest.raises(SystemExit, match=f"already holds taxadiffusion~unet-all, measured by `{old}`") as stop:
            check(argv)
        assert "would replace it: name this investigation otherwise" in str(stop.value), why
    assert table1.read_record(results) == kept  # nothing written


def test_table1_writes_its_tables_under_the_records_lock(table1, tmp_path, monkeypatch):
    """Two rows finishing together: the one writing its tables holds the lock that a record's writer waits for, so
    a table written from an older record cannot replace a newer one."""
    import fcntl

    results = tmp_path / "quality_cub"
    table1.keep_record(results, {"flat": evaluated(3.0, ["genus"], 200.0)})
    held = []

    def write_results(*_args):  # another process's attempt at the lock while the tables are being written
        with (results / "metrics.json.lock").open("w") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(True)
        return results / "report.md"

    monkeypatch.setattr(table1, "write_results", write_results)
    (results / "classifier").mkdir()
    (results / "classifier" / "heldout_accuracy.json").write_text("{}")
    assert table1.main(["--dataset", "cub", "--tables", "--results", str(tmp_path)]) == 0
    assert held == [True]
    table1.keep_record(results, {"full": evaluated(3.0, ["genus"], 190.0)})  # released after
    assert set(table1.table_rows(table1.read_record(results))) == {"flat", "full"}


def test_table1_priors_are_committed_or_remade_by_their_configs(table1, tmp_path):
    """CUB-100-LT's Table 1 prior is in the repository beside the config that made it (test_prior.py checks that
    the file's recipe is that config). Fish4Knowledge's is not (the tree's budget, tests/test_tree.py): its config
    is, and the benchmark stops before any work with the one command that remakes it."""
    committed = table1.prior_pack("cub")
    assert committed.is_file() and table1.prior_config(committed).is_file()
    for dataset in table1.DATASETS:
        pack = table1.prior_pack(dataset)
        assert table1.prior_config(pack).is_file()
        if not pack.is_file():
            args = table1.parse_args(["--dataset", dataset, "--results", str(tmp_path)])
            with pytest.raises(SystemExit, match=r"taxadiffusion pretrain --config \S*prior_birds_fish\.yaml"):
                table1.prior_folder(args, tmp_path)


@pytest.fixture
def speed(monkeypatch):
    """benchmarks/speed.py as a module, with a model small enough for a test ("tiny": 32 px, one-layer text tower)."""
    module = load_benchmark(monkeypatch, "speed")
    tiny = module.ModelSpec(
        "tiny",
        32,
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8),
        encoder_heads=2,
    )
    monkeypatch.setitem(module.SPECS, "tiny", tiny)
    return module


@pytest.fixture
def reset_accelerate():
    """accelerate's process-wide state keeps the precision it was first given; the benchmark runs each job in a
    fresh process, the test in this one, clearing the state between jobs (and after, for the tests that follow)."""
    from accelerate.state import AcceleratorState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)

    yield reset
    reset()


def test_speed_switches_time_the_trainers_step_with_what_each_names(speed, tmp_path, reset_accelerate):
    """Each switch job runs the trainer's own step with its switch on and the others off (read back from the model
    and optimizer it ran), and the report gives each one's speed-up against none."""
    speed.prepare(tmp_path, "tiny")
    ran = {}
    for switch in ("none", "frozen base in low precision", "fused AdamW"):
        reset_accelerate()
        ran[switch] = speed.switch_step_job(str(tmp_path), switch, "first", 4, 2, "cpu", "bf16")
        assert len(ran[switch]["times"]) == 2 and ran[switch]["first_step"] > 0 and ran[switch]["ranks"] == 1
    assert [(r["unet_base_dtype"], r["compiled"], r["fused"]) for r in ran.values()] == [
        ("float32", False, False),
        ("bfloat16", False, False),
        ("float32", False, True),
    ]
    # the report: every switch at the stage, its median against none's
    jobs = {f"{s}/first": ran.get(s, ran["none"]) for s in speed.SWITCHES}
    results = {
        "machine": "test CPU",
        "settings": {"sd15": False, "precision": "bf16", "stages": ["first"], "batch": 4, "rounds": 1, "reps": 2},
        "flops": {"small": speed.flops_per_sample(speed.SMALL), "sd15": speed.flops_per_sample(speed.SMALL)},
        "peak_tflops": None,
        "switches": {key: speed.merged([job]) | {"first_step": job["first_step"]} for key, job in jobs.items()},
    }
    text = speed.switches_report(results, speed.SPECS["tiny"], ["--part", "switches"])
    none, fused = (results["switches"][f"{s}/first"]["seconds"]["median"] for s in ("none", "fused AdamW"))
    assert f"| first (1 rank) | fused AdamW | {1000 * fused:.0f} ms" in text
    assert f"{none / fused:.2f}x" in text and "| float32, eager, fused AdamW |" in text
    assert "| bfloat16, eager, default AdamW |" in text


def test_speed_evaluation_times_generation_apart_from_scoring(speed, tmp_path):
    """`--part evaluation` runs `Evaluation.run` twice in one folder: from nothing, then on the kept images with the
    scores deleted, so that the second run scores without generating."""
    speed.prepare(tmp_path, "tiny")
    result = speed.evaluation_job(str(tmp_path), 2, "cpu")
    assert result["taxa"] == 2 and result["images"] == 20 and result["real"] > 0
    assert set(result["seconds"]) == {"everything", "scoring"}
    assert 0 < result["seconds"]["scoring"] < result["seconds"]["everything"]
    results = {"machine": "test CPU", "settings": {"precision": "no"}, "evaluation": result}
    text = speed.evaluation_report(results, speed.SPECS["tiny"], [])
    assert "| generation |" in text and "fp32 (`evaluate`'s default)" in text and "A small model" in text
    text = speed.evaluation_report(results, speed.SD15, [])
    assert "iNaturalist 2021's evaluation (162,600 images" in text
