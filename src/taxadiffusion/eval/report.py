"""Reports a person wants to read: the paper-style table, a rare/common table, bar plots and sample grids.

`report.md` and `report.html` hold the same cells, formatted from `metrics.json` (the numbers' one source).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import MissingInput, UnreadableFile

# (key in metrics.json, column title, format, higher is better)
METRICS = (
    ("fid", "FID", "{:.2f}", False),
    ("kid", "KID", "{:.4f}", False),
    ("lpips", "LPIPS", "{:.4f}", False),
    ("bioclip", "BioCLIP", "{:.2f}", True),
    ("accuracy", "Acc", "{:.1%}", True),
)
SHORT = {"specific_epithet": "species"}


def metric_value(scores: dict, key: str, rank: str) -> float | None:
    value = scores.get(key)
    if isinstance(value, dict):  # accuracy: read at the rank the images were conditioned on
        value = value.get(rank)
    return value


def format_value(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def load_runs(paths: list[str | Path]) -> dict[str, dict]:
    runs = {}
    for path in paths:
        path = Path(path)
        file = path / "metrics.json" if path.is_dir() else path
        if not file.is_file():
            raise MissingInput(f"{file} not found; run `taxadiffusion evaluate` for {path} first")
        name = file.parent.name
        while name in runs:
            name += "'"
        try:
            runs[name] = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UnreadableFile(file, f"not valid JSON ({error})", "run `taxadiffusion evaluate` again") from None
    return runs


def summary_lines(metrics: dict) -> str:
    """One line per rank of an evaluation's headline numbers, as `evaluate` prints them."""
    lines = []
    for rank, groups in metrics["ranks"].items():
        scores = groups["all"]
        line = f"  {rank:<17} FID {scores['fid']:8.2f}  KID {scores.get('kid', float('nan')):.4f}"
        line += f"  LPIPS {scores['lpips']:.4f}"
        if "accuracy" in scores:
            line += f"  acc {scores['accuracy'][rank]:.1%} (real {scores['real_accuracy'][rank]:.1%})"
        lines.append(line)
    return "\n".join(lines)


def compare(run_folders: list[str | Path], out: str | Path) -> tuple[int, Path, Path]:
    """One report tabulating evaluated runs: (how many, report.md, report.html)."""
    runs = load_runs(run_folders)
    md, html_path = write_report(out, runs, title="taxadiffusion: runs compared")
    return len(runs), md, html_path


def _ranks(runs: dict[str, dict]) -> list[str]:
    ranks: list[str] = []
    for metrics in runs.values():
        ranks += [r for r in metrics["ranks"] if r not in ranks]
    return ranks


def _present(runs: dict[str, dict]) -> list[tuple]:
    """The metrics at least one run has."""
    return [
        m
        for m in METRICS
        if any(m[0] in scores.get("all", {}) for metrics in runs.values() for scores in metrics["ranks"].values())
    ]


def main_table(runs: dict[str, dict], group: str = "all") -> list[list[str]]:
    """Rows = runs, columns = metric x rank (the paper's Table 1 layout)."""
    ranks, metrics = _ranks(runs), _present(runs)
    header = ["run"] + [f"{title} {'↑' if up else '↓'} {SHORT.get(r, r)}" for _, title, _, up in metrics for r in ranks]
    rows = [header]
    for name, run in runs.items():
        row = [name]
        for key, _, fmt, _ in metrics:
            for rank in ranks:
                scores = run["ranks"].get(rank, {}).get(group, {})
                row.append(format_value(metric_value(scores, key, rank), fmt))
        rows.append(row)
    return rows


def split_table(runs: dict[str, dict]) -> list[list[str]]:
    """Rare vs common taxa (by number of training images), per run and each rank it was evaluated at."""
    ranks, metrics = _ranks(runs), _present(runs)
    rows = [
        ["run", "rank", "taxa (rare/common)"]
        + [f"{t} rare" for _, t, _, _ in metrics]
        + [f"{t} common" for _, t, _, _ in metrics]
    ]
    for name, run in runs.items():
        for rank in (r for r in ranks if r in run["ranks"]):
            groups = run["ranks"][rank]
            rare, common = groups.get("rare", {}), groups.get("common", {})
            row = [name, SHORT.get(rank, rank), f"{rare.get('taxa', 0)}/{common.get('taxa', 0)}"]
            row += [format_value(metric_value(rare, k, rank), f) for k, _, f, _ in metrics]
            row += [format_value(metric_value(common, k, rank), f) for k, _, f, _ in metrics]
            rows.append(row)
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def bar_plots(runs: dict[str, dict], out: Path) -> list[Path]:
    """One PNG per metric: bars per rank, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = _ranks(runs)
    paths = []
    for key, title, _, up in _present(runs):
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(ranks), 3.2))
        width = 0.8 / max(1, len(runs))
        for i, (name, run) in enumerate(runs.items()):
            values = [metric_value(run["ranks"].get(r, {}).get("all", {}), key, r) for r in ranks]
            ax.bar(
                [x + i * width for x in range(len(ranks))],
                [v if v is not None else 0 for v in values],
                width,
                label=name,
            )
        ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(ranks))], [SHORT.get(r, r) for r in ranks])
        ax.set_title(f"{title} by rank ({'higher' if up else 'lower'} is better)")
        if len(runs) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"plot_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_keeping_section(path: Path, generated: str, heading: str = "## Reading") -> None:
    """Write a generated Markdown file, keeping the hand-written section (from `heading` to the end) that
    the file already holds: results are regenerated, their reading is not."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    kept = old[old.index(heading) :] if heading in old else ""
    write_text_atomic(path, generated + ("\n" + kept if kept else ""))


def write_report(out: str | Path, runs: dict[str, dict], title: str = "taxadiffusion evaluation") -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = bar_plots(runs, out)
    grids = sorted((out / "grids").glob("*.png")) if (out / "grids").is_dir() else []
    main, split = main_table(runs), split_table(runs)
    settings = next(iter(runs.values()))["settings"]
    notes = [
        f"Protocol: {settings.get('protocol', 'project')} "
        f"({settings.get('protocol_description', 'FID, KID and LPIPS at the compared resolution')}).",
        f"Feature network: {settings.get('feature_network')}; {settings.get('resize_rule')}.",
        f"LPIPS: {settings.get('lpips')}.",
        f"Per taxon: {settings.get('per_taxon')} generated images, up to {settings.get('max_real_per_taxon')} real; "
        f"{settings.get('steps')} steps, {settings.get('guidance')} guidance, scale {settings.get('scale')}; "
        f"seed {settings.get('seed')}.",
        f"Rare taxa: fewer than {settings.get('rare_threshold')} training images.",
        "Acc: top-1 accuracy of the taxonomic classifier at the rank the images were conditioned on."
        if settings.get("classifier")
        else "Acc: not computed (no --classifier).",
        "BioCLIP: 100 x cosine(image, taxonomic name)."
        if settings.get("bioclip")
        else "BioCLIP: not computed (no --bioclip weights).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in settings.get("versions", {}).items()) + ".",
    ]
    md = [
        f"# {title}",
        "",
        markdown_table(main),
        "",
        "## Rare vs common taxa",
        "",
        markdown_table(split),
        "",
        "## Settings",
        "",
    ]
    md += [f"- {n}" for n in notes] + ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if grids:
        md += ["", "## Samples", ""] + [
            f"**{SHORT.get(g.stem, g.stem)}**\n\n![{g.stem}](grids/{g.name})\n" for g in grids
        ]
    md_path = out / "report.md"
    write_text_atomic(md_path, "\n".join(md) + "\n")

    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}img{max-width:100%}"
    )
    body = [f"<h1>{html.escape(title)}</h1>", html_table(main), "<h2>Rare vs common taxa</h2>", html_table(split)]
    body += ["<h2>Settings</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul><h2>Plots</h2>"]
    body += [f'<img src="{p.name}" alt="{p.stem}">' for p in plots]
    if grids:
        body += ["<h2>Samples</h2>"] + [
            f'<h3>{SHORT.get(g.stem, g.stem)}</h3><img src="grids/{g.name}">' for g in grids
        ]
    html_path = out / "report.html"
    write_text_atomic(
        html_path,
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
        + "\n".join(body)
        + "\n",
    )
    return md_path, html_path
