import json

import pytest

from conftest import leftovers, read_jsonl_dir, write_jsonl
from lmforge.data.clean import CleanConfig, clean_corpus, normalize_whitespace, repeated_line_ratio, symbol_ratio, transform
from lmforge.data.html import html_to_text
from lmforge.data.sources import Document
from lmforge.errors import LmforgeError

NO_FILTERS = dict(min_chars=0, max_symbol_ratio=1.0, max_repeated_lines=1.0, dedup_exact=False, dedup_near=False)


def run(text, is_html=False, **cfg):
    return transform(Document(text, "t", is_html), CleanConfig(**{**NO_FILTERS, **cfg}))[0]


def test_html_to_text_drops_boilerplate_and_keeps_structure():
    html = (
        "<html><head><title>T</title><style>p{}</style></head><body><nav>Home | About</nav>"
        "<h1>Title</h1><p>Hello <b>bold</b>\n   world &amp; more</p><script>alert(1)</script>"
        "<ul><li>one</li><li>two</li></ul><pre>  indented\n    code</pre></body></html>"
    )
    text = html_to_text(html)
    assert "alert" not in text and "Home" not in text and "p{}" not in text
    assert text.split("\n\n") == ["Title", "Hello bold world & more", "one", "two", "  indented\n    code"]


def test_html_step_only_for_html_documents():
    assert run("<p>x</p>", is_html=True) == "x"
    assert run("<p>x</p>", is_html=False) == "<p>x</p>"
    assert run("<p>x</p>", is_html=True, html=False) == "<p>x</p>"


def test_mojibake_is_repaired():
    assert run("cafÃ© and naÃ¯ve") == "café and naïve"
    assert run("cafÃ©", fix_mojibake=False) == "cafÃ©"


def test_unicode_normalization_forms():
    decomposed = "cafe\u0301 \ufb01le"  # e + combining acute; the "fi" ligature
    assert run(decomposed) == "caf\u00e9 \ufb01le"  # NFC composes, keeps the ligature
    assert run(decomposed, normalize="nfkc") == "caf\u00e9 file"
    assert run(decomposed, normalize="none") == decomposed


def test_control_characters_and_odd_spaces():
    assert run("a\x00b\x07c\ufeff\u200bd\te\nf") == "abcd\te\nf"
    assert run("a\x00b", control_chars=False) == "a\x00b"
    assert normalize_whitespace("x\u00a0y\r\nz  \r\n\n\n\n\n    indented  ") == "x y\nz\n\n\n    indented"


def test_lowercase_and_punctuation_are_opt_in():
    assert run("Hello, World!") == "Hello, World!"
    assert run("Hello, World!", lowercase=True) == "hello, world!"
    assert run("Hello, World! «quoted» (x)", strip_punctuation=True) == "Hello World quoted x"


def test_quality_measures():
    assert symbol_ratio("ab !!") == pytest.approx(0.5)
    assert symbol_ratio("   ") == 0.0
    assert repeated_line_ratio("a\nb\na\na\n\n") == pytest.approx(2 / 4)


def make_corpus(tmp_path, stdlib_texts):
    base = stdlib_texts[:8]
    near = base[0].replace("def ", "def  ", 1) + "\n# one extra comment line"
    docs = [
        *({"text": t} for t in base),
        {"text": base[1]},  # exact duplicate
        {"text": near},  # near duplicate
        {"text": "tiny"},  # too short
        {"text": "#$%^&*()!@#$%^&*()_+{}|:<>?" * 5},  # symbols
        {"text": "spam spam\n" * 30},  # repeated lines
        {"text": "   \n\t  "},  # empty after cleaning
    ]
    write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    return base


def test_clean_corpus_filters_dedups_and_records_stats(tmp_path, stdlib_texts):
    base = make_corpus(tmp_path, stdlib_texts)
    stats = clean_corpus([tmp_path / "in"], tmp_path / "out", CleanConfig(), progress=False, workers=1)
    kept = read_jsonl_dir(tmp_path / "out")
    assert len(kept) == len(base)
    assert [r["text"] for r in kept] == [transform(Document(t, "x"), CleanConfig())[0] for t in base]
    assert all(r["source"].startswith(str(tmp_path / "in" / "docs.jsonl:")) for r in kept)
    assert stats["removed"] == {
        "exact_duplicate": 1, "near_duplicate": 1, "too_short": 1, "symbol_ratio": 1, "repeated_lines": 1, "empty": 1
    }
    assert stats["input"]["documents"] == len(base) + 6
    assert stats["output"]["documents"] == len(base)
    on_disk = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert on_disk["removed"] == stats["removed"] and on_disk["config"]["near_threshold"] == 0.85


def test_each_filter_can_be_switched_off(tmp_path, stdlib_texts):
    base = make_corpus(tmp_path, stdlib_texts)
    stats = clean_corpus([tmp_path / "in"], tmp_path / "out", CleanConfig(**NO_FILTERS), progress=False, workers=1)
    assert stats["removed"] == {"empty": 1}
    assert stats["output"]["documents"] == len(base) + 5


def test_parallel_cleaning_gives_identical_output(tmp_path, stdlib_texts):
    make_corpus(tmp_path, stdlib_texts)
    clean_corpus([tmp_path / "in"], tmp_path / "one", progress=False, workers=1)
    clean_corpus([tmp_path / "in"], tmp_path / "two", progress=False, workers=2)
    assert read_jsonl_dir(tmp_path / "one") == read_jsonl_dir(tmp_path / "two")


def test_output_is_sharded(tmp_path, stdlib_texts):
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in stdlib_texts[:20]])
    stats = clean_corpus([tmp_path / "in.jsonl"], tmp_path / "out", shard_mb=0.05, progress=False, workers=1)
    assert len(stats["output"]["shards"]) > 2
    assert len(read_jsonl_dir(tmp_path / "out")) == stats["output"]["documents"]


def test_failure_mid_run_leaves_no_output(tmp_path, stdlib_texts):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in stdlib_texts[:5]])
    (tmp_path / "in" / "b.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(LmforgeError, match=r"b\.jsonl:2: invalid JSON"):
        clean_corpus([tmp_path / "in"], tmp_path / "out", progress=False, workers=1)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path, stdlib_texts):
    write_jsonl(tmp_path / "in.jsonl", [{"text": stdlib_texts[0]}])
    clean_corpus([tmp_path / "in.jsonl"], tmp_path / "out", progress=False, workers=1)
    with pytest.raises(LmforgeError, match="already exists; pass --overwrite"):
        clean_corpus([tmp_path / "in.jsonl"], tmp_path / "out", progress=False, workers=1)
    clean_corpus([tmp_path / "in.jsonl"], tmp_path / "out", progress=False, workers=1, overwrite=True)


def test_nothing_survives_is_an_error(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "short"}])
    with pytest.raises(LmforgeError, match=r"no document survived cleaning \(1 read; removed: \{'too_short': 1\}\)"):
        clean_corpus([tmp_path / "in.jsonl"], tmp_path / "out", progress=False, workers=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("max_symbol_ratio", 1.5), ("near_threshold", 0.0), ("min_chars", -1)])
def test_bad_config_values(field, value):
    with pytest.raises(LmforgeError, match=field.replace("_", "-")):
        CleanConfig(**{field: value})
