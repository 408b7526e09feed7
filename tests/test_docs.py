"""The docs a newcomer reads: the README stays short, its links resolve, and every figure in it is the figure
of the results file it links to. The product names nothing outside the repository."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of a text, as rows of cells (the separator row left out)."""
    found, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip().strip("*") for cell in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r"-+", cell) for cell in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def table_with(text: str, first_header: str, other_header: str) -> list[list[str]]:
    """The table whose header starts with `first_header` and holds `other_header`."""
    return next(t for t in tables(text) if t[0][0] == first_header and other_header in t[0])


def test_the_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.split()) <= 2100
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make demo", "make test"]


def test_every_local_link_of_the_docs_resolves():
    for doc in [README, *(REPO / "docs").glob("*.md"), RESULTS / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://")):
                assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to a missing {target}"


RECORDS = [("CUB-100-LT", "quality_cub.md"), ("Fish4Knowledge", "quality_f4k.md")]


@pytest.mark.parametrize(("dataset", "results"), RECORDS)
def test_the_readme_results_are_the_tables_of_record(dataset, results):
    readme = table_with(README.read_text(encoding="utf-8"), "row", f"{dataset} acc. order")
    record = table_with((RESULTS / results).read_text(encoding="utf-8"), "run", "FID ↓ order")
    columns = {"acc. order": "Acc ↑ order", "acc. species": "Acc ↑ species", "KID species": "KID ↓ species"}
    rows = {"zero-shot (SD)": "zero-shot", "flat (SD + LoRA)": "flat", "full (SD + full)": "full"}
    by_run = {row[0]: dict(zip(record[0], row, strict=True)) for row in record[1:]}
    measured = 0
    for row in readme[1:]:
        cells = dict(zip(readme[0], row, strict=True))
        run = by_run.get(rows.get(row[0], row[0].lower()))
        if run is None:  # a row the table of record does not hold yet (a Table 1 measured again) reads "–"
            assert all(cells[f"{dataset} {ours}"] == "–" for ours in columns), (dataset, row[0])
            continue
        for ours, theirs in columns.items():
            assert cells[f"{dataset} {ours}"] == run[theirs], (dataset, row[0], ours)
        measured += 1
    assert measured >= 3  # zero-shot, flat and TaxaDiffusion at least


def test_the_readme_demo_figures_are_demo_md():
    readme = table_with(README.read_text(encoding="utf-8"), "rank", "accuracy")
    record = table_with((RESULTS / "demo.md").read_text(encoding="utf-8"), "rank", "accuracy")
    assert readme == record and len(readme) == 4


def test_the_product_names_nothing_outside_the_repository():
    """Only .ci/run knows where CI keeps the datasets; everything else takes TAXADIFFUSION_DATA or an argument."""
    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    allowed = {".ci/run", "tests/test_docs.py", "tests/test_presets.py"}
    for name in names.splitlines():
        path = REPO / name
        if name in allowed or not path.is_file() or path.suffix not in {".py", ".md", ".yaml", ".toml", ".cff", ""}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        assert "DESIGN.md" not in text and "../shared" not in text, name


def test_the_readme_module_table_names_every_module():
    """Every module and subpackage of src/taxadiffusion appears in the README's table of the code, and the table
    names nothing that is not there."""
    package = REPO / "src" / "taxadiffusion"
    table = table_with(README.read_text(encoding="utf-8"), "module", "what it holds")
    named = {name for row in table[1:] for name in re.findall(r"`([\w/]+\.py|\w+/)`", row[0])}
    present = {p.name for p in package.glob("*.py") if not p.name.startswith("__")}
    present |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert named == present
