"""Documents with nothing in them for a step to work on (no words, no letters, only symbols,
only whitespace or control characters) get a defined, counted fate in every cleaning step and in
dedup, instead of stopping the whole corpus (issue 17: "could not broadcast input array from
shape (0,) into shape (11,)" from a line of "$$$$%%%%^^^^&&&&")."""
import json

import pytest

from fastlm.data import prepare
from fastlm.data.__main__ import main as cli
from fastlm.data.clean import CleanConfig, clean_document
from fastlm.data.dedup import DedupConfig, Deduper, DedupHasher

WORDLESS = "$$$$%%%%^^^^&&&&"
EDGE_CASES = ["", " ", "\n\n\n", "\t", "\x00\x01", "\ufeff", "\u00a0\u3000", "\r\n\r", WORDLESS,
              "@@@ ###", "__", "é", "a", "1.2.3.4", b"", b"\xff\xfe", "\ud800"]
ALL_STEPS = {"pii": True, "lowercase": True, "min_chars": 0, "max_chars": 10_000,
             "max_symbol_ratio": 0.5, "max_repeated_line_frac": 0.3}


@pytest.mark.parametrize("policy", ["replace", "drop"])
@pytest.mark.parametrize("doc", EDGE_CASES, ids=repr)
def test_every_cleaning_step_gives_edge_cases_a_counted_fate(doc, policy):
    report: dict = {}
    out = clean_document(doc, CleanConfig(invalid_utf8=policy, **ALL_STEPS), report)
    dropped = {k: v for k, v in report.items() if k.startswith("dropped_")}
    assert report["documents_in"] == 1
    if out is None:  # dropped: exactly one reason, counted once
        assert list(dropped.values()) == [1], report
    else:
        assert not dropped and out.strip(), (out, report)


@pytest.mark.parametrize("doc", [WORDLESS, "@@@ ###", "", "\n"], ids=repr)
def test_wordless_document_is_unique_for_near_dedup(doc):
    hasher = DedupHasher(DedupConfig())
    exact, bands = hasher.keys(doc)
    assert bands.shape == (0,)
    dd = Deduper(DedupConfig())
    assert dd.check_and_add(*hasher.keys("some words to remember here")) is None
    assert dd.check_and_add(exact, bands) is None  # kept: no band can collide
    assert dd.check_and_add(exact, bands) == "dropped_exact_dup"  # its exact copy is not


def test_dedup_log_of_a_wordless_document_reloads(tmp_path):
    hasher = DedupHasher(DedupConfig())
    dd = Deduper(DedupConfig())
    dd.open_log(tmp_path / "dedup.log", 0)
    words = "alpha beta gamma delta epsilon zeta eta theta"
    for doc in (words, WORDLESS):
        assert dd.check_and_add(*hasher.keys(doc)) is None
    size = dd.flush_log()
    dd.close()
    again = Deduper(DedupConfig())
    again.open_log(tmp_path / "dedup.log", size)
    assert again.exact == dd.exact and again.bands == dd.bands
    assert again.check_and_add(*hasher.keys(WORDLESS)) == "dropped_exact_dup"
    assert again.check_and_add(*hasher.keys(words + "!")) == "dropped_near_dup"
    again.close()


def test_prepare_keeps_a_wordless_document_once(tmp_path):
    src = tmp_path / "docs.jsonl"
    words = "hello world this is a document with enough words in it"
    rows = [words, WORDLESS, WORDLESS, "@@@ ###", "   "]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    manifest = prepare([str(src)], tmp_path / "out", workers=1, val_fraction=0.0,
                       progress=False)
    report = manifest["cleaning"]
    assert report["documents_in"] == 5
    assert report["dropped_exact_dup"] == 1 and report["dropped_empty"] == 1
    assert report["documents_out"] == 3
    expected = sum(len(t) + 1 for t in (words, WORDLESS, "@@@ ###"))  # EOT + bytes each
    assert manifest["splits"]["train"]["tokens"] == expected


def test_prepare_cli_on_the_issue_example(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hello world"}\n{"text": "$$$$%%%%^^^^&&&&"}\n')
    assert cli(["prepare", str(src), "--out", str(tmp_path / "out"), "--quiet",
                "--workers", "1"]) == 0
    assert "documents out" in capsys.readouterr().out


def test_symbol_filter_drops_wordless_documents_when_asked(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hello world, plain words"}\n{"text": "$$$$%%%%^^^^&&&&"}\n')
    manifest = prepare([str(src)], tmp_path / "out", workers=1, val_fraction=0.0,
                       progress=False, clean=CleanConfig(max_symbol_ratio=0.5))
    assert manifest["cleaning"]["dropped_symbol_ratio"] == 1
    assert manifest["cleaning"]["documents_out"] == 1
