"""CITATION.cff: the book cites as software, with the paper and the review as references taken from references.bib."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Citation File Format 1.2.0: the keys a file must have, and the reference types it knows (a part of its schema).
REQUIRED = {"cff-version", "message", "title", "authors"}
REFERENCE_TYPES = {"article", "book", "conference-paper", "conference", "proceedings", "report", "software", "thesis",
                   "unpublished", "generic", "data", "manual", "pamphlet"}


def cff() -> dict:
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


def bib_entry(key: str) -> dict[str, str]:
    "One entry of references.bib: field -> value, braces and TeX quotes dropped."
    text = (ROOT / "references.bib").read_text(encoding="utf-8")
    body = re.search(rf"@\w+\{{{re.escape(key)},(.*?)\n\}}", text, re.S)
    assert body, f"references.bib has no entry {key}"
    fields = dict(re.findall(r"(\w+)\s*=\s*\{(.*?)\},?\s*$", body.group(1), re.M))
    return {k: re.sub(r"``|''", '"', v).replace("{", "").replace("}", "") for k, v in fields.items()}


def family_names(bib_authors: str) -> list[str]:
    return [a.split(",")[0].strip() for a in bib_authors.split(" and ")]


def test_citation_file_has_the_fields_of_cff_1_2_0():
    data = cff()
    assert REQUIRED <= set(data), REQUIRED - set(data)
    assert data["cff-version"] == "1.2.0" and data["type"] == "software"
    assert all(("family-names" in a) or ("name" in a) for a in data["authors"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert str(data["version"]) == project["version"] and data["license"] == project["license"]["text"]
    for ref in data["references"]:
        assert ref["type"] in REFERENCE_TYPES and ref["title"] and ref["authors"], ref
        assert all({"family-names", "given-names"} <= set(a) for a in ref["authors"]), ref


@pytest.mark.parametrize("key", ["wang2022not", "eriksson2025review"])
def test_the_references_are_the_bibliographys_entries(key):
    bib = bib_entry(key)
    matches = [r for r in cff()["references"] if r["title"] == bib["title"]]
    assert len(matches) == 1, f"CITATION.cff has no reference titled {bib['title']!r}"
    ref = matches[0]
    assert [a["family-names"] for a in ref["authors"]] == family_names(bib["author"])
    assert ref["year"] == int(bib["year"])
    if "pages" in bib:
        assert f"{ref['start']}--{ref['end']}" == bib["pages"] and ref["volume"] == int(bib["volume"])
    if "eprint" in bib:
        assert any(i["value"] == f"arXiv:{bib['eprint']}" for i in ref["identifiers"])
        assert ref["institution"]["name"] == bib["note"]
