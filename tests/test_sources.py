import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from lmforge.data.sources import DocumentReader, expand_inputs
from lmforge.errors import LmforgeError


def test_folder_walk_filters_extensions_and_sorts(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("ay")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00")
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "see"}\n'))
    files = expand_inputs([tmp_path])
    assert [f.name for f in files] == ["b.txt", "c.jsonl.gz", "a.md"]


def test_glob_and_duplicates(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "y.txt").write_text("y")
    files = expand_inputs([str(tmp_path / "*.txt"), tmp_path / "x.txt"])
    assert [f.name for f in files] == ["x.txt", "y.txt"]


@pytest.mark.parametrize("bad, message", [("missing.txt", "no such file"), ("*.nothing", "glob matched no files")])
def test_missing_inputs_name_the_path(tmp_path, bad, message):
    with pytest.raises(LmforgeError, match=message) as e:
        expand_inputs([str(tmp_path / bad)])
    assert bad in str(e.value)


def test_reads_every_format(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.html").write_text("<p>hi</p>")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "one", "id": 1}, {"text": "two"}])
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress("zipped é".encode()))
    pq.write_table(pa.table({"body": ["p1", None, "p2"]}), tmp_path / "e.parquet")
    docs = list(DocumentReader([tmp_path], text_field="text", extensions=[".txt", ".html", ".jsonl"]))
    assert [(d.text, d.is_html) for d in docs] == [
        ("plain text", False), ("<p>hi</p>", True), ("one", False), ("two", False), ("zipped é", False)
    ]
    assert docs[3].source.endswith("c.jsonl:2")
    parquet = list(DocumentReader([tmp_path / "e.parquet"], text_field="body"))
    assert [d.text for d in parquet] == ["p1", "p2"]


def test_jsonl_errors_carry_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(LmforgeError, match=r"c\.jsonl:2: no field 'text' \(fields: 'body'\)"):
        list(DocumentReader([f]))
    f.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(LmforgeError, match=r"c\.jsonl:2: invalid JSON"):
        list(DocumentReader([f]))
    f.write_text('{"text": 5}\n')
    with pytest.raises(LmforgeError, match=r"c\.jsonl:1: field 'text' is int"):
        list(DocumentReader([f]))


def test_invalid_utf8_replaced_and_counted_or_rejected(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf".encode() + b"\xe9\xff and more")
    reader = DocumentReader([f])
    (doc,) = list(reader)
    assert doc.text == "caf\ufffd\ufffd and more"
    assert reader.stats.decode_replacements == 2
    with pytest.raises(LmforgeError, match=r"latin\.txt: invalid UTF-8 at byte 3"):
        list(DocumentReader([f], encoding_errors="strict"))


def test_binary_file_is_an_error_or_a_counted_skip(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "blob.txt").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(LmforgeError, match=r"blob\.txt: binary file \(NUL byte at offset 3\)"):
        list(DocumentReader([tmp_path]))
    reader = DocumentReader([tmp_path], skip_bad_files=True)
    assert [d.text for d in reader] == ["fine"]
    assert list(reader.stats.skipped_files) == [str(tmp_path / "blob.txt")]


def test_corrupt_gzip_is_an_error(tmp_path):
    f = tmp_path / "bad.txt.gz"
    f.write_bytes(gzip.compress(b"hello world" * 100)[:-20])
    with pytest.raises(LmforgeError, match=r"bad\.txt\.gz: cannot read"):
        list(DocumentReader([f]))


def test_progress_reports_every_byte(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "x" * 100}] * 50)
    (tmp_path / "d.txt").write_text("hello")
    seen = []
    reader = DocumentReader([tmp_path], on_progress=seen.append)
    list(reader)
    assert sum(seen) == reader.total_bytes() == reader.stats.bytes_read
