import pytest

from taxadiffusion.taxonomy import (
    FISHNET_RANKS,
    STANDARD_RANKS,
    AmbiguousTaxonError,
    Lineage,
    LineageError,
    Rank,
    Taxonomy,
    UnknownTaxonError,
    condition_text,
    parse_ranks,
)

R5 = FISHNET_RANKS  # class .. specific_epithet


def lin(*names):
    return Lineage(R5, tuple(names))


@pytest.fixture
def tree():
    lineages = [
        lin("Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "clarkii"),
        lin("Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "clarkii"),
        lin("Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "ocellaris"),
        lin("Actinopterygii", "Perciformes", "Pomacentridae", "Chromis"),
        lin("Actinopterygii", "Perciformes", "Labridae", "Hemigymnus", "fasciatus"),
        # A homonym: the same genus name under another family is another taxon.
        lin("Actinopterygii", "Tetraodontiformes", "Tetraodontidae", "Chromis", "fakeus"),
    ]
    return Taxonomy.from_lineages(lineages)


def test_ranks_parse_and_order():
    assert len(STANDARD_RANKS) == 7
    assert Rank.parse("Species") is Rank.SPECIFIC_EPITHET
    assert parse_ranks(["class", "order"]) == (Rank.CLASS, Rank.ORDER)
    with pytest.raises(ValueError, match="coarse to fine"):
        parse_ranks(["order", "class"])
    with pytest.raises(ValueError, match="unknown rank"):
        Rank.parse("tribe")


def test_condition_text_uses_epithet_and_none():
    assert condition_text(Rank.FAMILY, "Pomacentridae") == "family: Pomacentridae"
    assert condition_text("species", "abdominalis") == "specific_epithet: abdominalis"
    assert condition_text(Rank.GENUS, None) == "genus: None"
    assert lin("A", "B", "C").texts() == [
        "class: A",
        "order: B",
        "family: C",
        "genus: None",
        "specific_epithet: None",
    ]


def test_lineage_allows_only_tail_gaps():
    ok = Lineage.from_mapping(R5, {Rank.CLASS: "A", Rank.ORDER: "B", Rank.FAMILY: " C "})
    assert ok.names == ("A", "B", "C") and ok.depth == 3 and ok.finest_rank is Rank.FAMILY
    with pytest.raises(LineageError) as error:
        Lineage.from_mapping(R5, {Rank.CLASS: "A", Rank.FAMILY: "C"})
    assert error.value.reason == "missing order"
    assert lin("A", "B", "C", "Amphiprion", "clarkii").scientific_name == "Amphiprion clarkii"


def test_ids_are_stable_and_parents_consistent(tree):
    genus = tree.level("genus")
    names = [t.name for t in tree.taxa("genus")]
    assert len(names) == 4  # Amphiprion, Chromis (x2: homonyms), Hemigymnus
    # Ids follow sorted paths, so they do not depend on record order.
    shuffled = Taxonomy.from_lineages(reversed([tree.lineage(t) for t in tree.leaves()]))
    assert [t.path for t in shuffled.taxa("genus")] == [t.path for t in tree.taxa("genus")]
    for taxon in tree.taxa("genus"):
        parent = tree.parent(taxon)
        assert parent.level == genus - 1 and parent.id == taxon.parent
        assert taxon in tree.children(parent)
    ids = tree.ids(lin("Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "ocellaris"))
    assert len(ids) == 5
    assert tree.taxon("specific_epithet", ids[-1]).name == "ocellaris"


def test_counts_include_descendants(tree):
    assert tree.resolve("Pomacentridae").count == 4
    assert tree.resolve("Amphiprion clarkii").count == 2
    assert tree.resolve("Actinopterygii").count == 6


def test_homonyms_kept_apart(tree):
    matches = tree.find("chromis")
    assert len(matches) == 2
    assert {m.path[2] for m in matches} == {"Pomacentridae", "Tetraodontidae"}
    with pytest.raises(AmbiguousTaxonError, match="Pomacentridae"):
        tree.resolve("Chromis")
    assert tree.by_path(matches[0].path) == matches[0]


def test_lookup_is_case_insensitive_and_suggests(tree):
    assert tree.resolve("AMPHIPRION").rank is Rank.GENUS
    assert tree.resolve("amphiprion clarkii").name == "clarkii"
    with pytest.raises(UnknownTaxonError) as error:
        tree.resolve("Amphiprio")
    assert "Amphiprion" in error.value.suggestions
    assert "did you mean 'Amphiprion'" in str(error.value)
    with pytest.raises(UnknownTaxonError) as error:
        tree.resolve("Amphiprion clarki", rank="species")
    assert "Amphiprion clarkii" in error.value.suggestions


def test_json_round_trip(tree, tmp_path):
    path = tmp_path / "taxonomy.json"
    tree.save(path)
    loaded = Taxonomy.load(path)
    assert loaded == tree
    assert loaded.ranks == tree.ranks
    assert [(t.path, t.id, t.count) for t in loaded.taxa("genus")] == [
        (t.path, t.id, t.count) for t in tree.taxa("genus")
    ]
    with pytest.raises(ValueError, match="not a taxadiffusion taxonomy"):
        Taxonomy.from_dict({"ranks": []})


def test_tree_refuses_orphans():
    with pytest.raises(ValueError, match="no ancestor"):
        Taxonomy(R5, {("A",): 1, ("A", "B", "C"): 1})
