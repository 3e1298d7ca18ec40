"""`lmforge eval bleu`: identical to the `sacrebleu` command on the same files (2 reference
streams), the per-example reference layout (JSONL, variable counts), generation, bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl

SACREBLEU = Path(sys.executable).parent / "sacrebleu"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_texts) -> dict:
    """Hypotheses and two reference streams made from real sentences: references paraphrase by
    dropping and swapping words; hypotheses are noisier. Includes a blank segment, trailing
    spaces, a CRLF line and non-ASCII text, which the sacrebleu command reads in its own way."""
    rng = random.Random(3)
    lines = [ln.strip() for t in stdlib_texts[:10] for ln in t.splitlines() if len(ln.split()) >= 6][:60]
    assert len(lines) == 60

    def perturb(words: list[str], p: float) -> str:
        out = [w for w in words if rng.random() > p]
        if len(out) > 3 and rng.random() < 0.5:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        return " ".join(out)

    hyps = [perturb(ln.split(), 0.3) for ln in lines]
    ref1 = [perturb(ln.split(), 0.1) for ln in lines]
    ref2 = [perturb(ln.split(), 0.15) for ln in lines]
    hyps[5], ref1[7], ref2[9] = "", "Grüße aus Köln — déjà vu, naïve café", "  spaced out   "
    d = tmp_path_factory.mktemp("bleu")
    (d / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    (d / "ref1.txt").write_bytes(("\r\n".join(ref1[:3]) + "\n" + "\n".join(ref1[3:]) + "\n").encode())
    (d / "ref2.txt").write_text("\n".join(ref2 + []) + "  \n", encoding="utf-8")  # no final newline issue, trailing spaces
    return {"dir": d, "hyps": hyps, "ref1": ref1, "ref2": ref2}


def sacrebleu_cli(hyp: Path, *refs: Path) -> dict:
    proc = subprocess.run([str(SACREBLEU), *map(str, refs), "-i", str(hyp), "-m", "bleu", "chrf", "ter",
                           "-w", "10", "-f", "json"], capture_output=True, text=True, check=True)
    return {d["name"]: d for d in json.loads(proc.stdout)}


def test_identical_to_the_sacrebleu_command_with_two_references(cli, corpus, tmp_path):
    d = corpus["dir"]
    r = cli("eval", "bleu", "--hyp", d / "hyp.txt", "--ref", d / "ref1.txt", "--ref", d / "ref2.txt",
            "-o", tmp_path / "b.json")
    assert r.code == 0, r.err
    ours = json.loads((tmp_path / "b.json").read_text())
    ref = sacrebleu_cli(d / "hyp.txt", d / "ref1.txt", d / "ref2.txt")
    assert round(ours["bleu"], 10) == ref["BLEU"]["score"]
    assert round(ours["chrf"], 10) == ref["chrF2"]["score"]
    assert round(ours["ter"], 10) == ref["TER"]["score"]
    assert ours["signature"] == ref["BLEU"]["signature"] == ours["signatures"]["bleu"]
    assert ours["signatures"]["chrf"] == ref["chrF2"]["signature"]
    assert ours["signatures"]["ter"] == ref["TER"]["signature"]
    assert "nrefs:2" in ours["signature"] and ours["segments"] == 60
    assert 5 < ours["bleu"] < 95  # a real, non-degenerate score
    md = (tmp_path / "b.md").read_text()
    assert f"{ours['bleu']:.2f}" in md and ours["signature"].replace("|", "\\|") in md
    # One reference stream: also identical (and different from two).
    r = cli("eval", "bleu", "--hyp", d / "hyp.txt", "--ref", d / "ref1.txt", "-o", tmp_path / "one.json")
    one = json.loads((tmp_path / "one.json").read_text())
    assert round(one["bleu"], 10) == sacrebleu_cli(d / "hyp.txt", d / "ref1.txt")["BLEU"]["score"] != ref["BLEU"]["score"]


def test_jsonl_references_per_example_are_transposed(corpus, tmp_path):
    """A JSONL with a list per example equals one file per stream; sacrebleu wants the transposed
    layout, and handing it the per-example lists scores something else entirely."""
    from sacrebleu.metrics import BLEU

    from lmforge.eval.bleu import evaluate_files, score, transpose

    d = corpus["dir"]
    per_example = [[a, b] for a, b in zip(corpus["ref1"], corpus["ref2"])]
    write_jsonl(tmp_path / "refs.jsonl", [{"references": refs} if i % 2 else refs for i, refs in enumerate(per_example)])
    files = evaluate_files(d / "hyp.txt", [d / "ref1.txt", d / "ref2.txt"])
    jsonl = evaluate_files(d / "hyp.txt", [tmp_path / "refs.jsonl"])
    assert jsonl["bleu"] == pytest.approx(files["bleu"], abs=1e-9) and jsonl["chrf"] == pytest.approx(files["chrf"], abs=1e-9)
    assert jsonl["ter"] == pytest.approx(files["ter"], abs=1e-9) and jsonl["signature"] == files["signature"]

    assert transpose([["a1", "a2"], ["b1"], ["c1", "c2", "c3"]]) == [["a1", "b1", "c1"], ["a2", None, "c2"], [None, None, "c3"]]
    hyps = corpus["hyps"][:3]
    wrong = BLEU().corpus_score(hyps, per_example[:3]).score  # the classic mistake: not transposed
    assert score(hyps, per_example[:3]).bleu != pytest.approx(wrong)

    # Variable numbers of references per example: sacrebleu's None-padded streams, nrefs:var.
    var = [refs[: 1 + i % 2] for i, refs in enumerate(per_example)]
    write_jsonl(tmp_path / "var.jsonl", var)
    got = evaluate_files(d / "hyp.txt", [tmp_path / "var.jsonl"])
    streams = [[r[0] for r in var], [r[1] if len(r) > 1 else None for r in var]]
    bleu = BLEU()
    assert got["bleu"] == pytest.approx(bleu.corpus_score(corpus["hyps"], streams).score, abs=1e-9)
    assert got["signature"] == str(bleu.get_signature()) and "nrefs:var" in got["signature"]
    assert got["references_per_example"] == [1, 2]


def test_generate_then_score(cli, tiny_model_dir, tmp_path, corpus):
    """--model/--data: batched greedy generation (the same hypotheses whatever the batch size),
    scored exactly as files are."""
    from lmforge.eval.bleu import BleuGenerateConfig, evaluate_files, generate_and_score

    pairs = [{"source": f"Translate: {s}", "reference": [r1, r2] if i % 3 else r1}
             for i, (s, r1, r2) in enumerate(zip(corpus["hyps"][:7], corpus["ref1"], corpus["ref2"]))]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = dict(template="{source} =>", max_new_tokens=6)  # stops at a newline: one line per hypothesis
    a = generate_and_score(str(tiny_model_dir), tmp_path / "pairs.jsonl", BleuGenerateConfig(batch_size=1, **cfg))
    b = generate_and_score(str(tiny_model_dir), tmp_path / "pairs.jsonl", BleuGenerateConfig(batch_size=3, **cfg))
    hyps = a["details"]["hypotheses"]
    assert hyps == b["details"]["hypotheses"] and len(hyps) == 7 and any(hyps)
    assert all("\n" not in h for h in hyps)
    (tmp_path / "gen.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    write_jsonl(tmp_path / "refs.jsonl", [p["reference"] for p in pairs])
    again = evaluate_files(tmp_path / "gen.txt", [tmp_path / "refs.jsonl"])
    assert (again["bleu"], again["chrf"], again["ter"]) == pytest.approx((a["bleu"], a["chrf"], a["ter"]), abs=1e-9)
    assert a["model"]["path"] and a["settings"]["decoding"] == "greedy" and a["settings"]["template"] == "{source} =>"
    r = cli("eval", "bleu", "--model", tiny_model_dir, "--data", tmp_path / "pairs.jsonl", "--max-new-tokens", 4,
            "-o", tmp_path / "g.json", "--no-progress")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "g.json").read_text())["segments"] == 7


def test_bad_input_names_file_and_line(cli, corpus, tmp_path):
    d = corpus["dir"]
    short = tmp_path / "short.txt"
    short.write_text("only\ntwo lines\n", encoding="utf-8")
    r = cli("eval", "bleu", "--hyp", short, "--ref", d / "ref1.txt")
    assert r.code == 1 and f"{short}: 2 hypotheses" in r.err and "60 references" in r.err
    r = cli("eval", "bleu", "--hyp", d / "hyp.txt", "--ref", d / "ref1.txt", "--ref", short)
    assert r.code == 1 and f"{short}: 2 references" in r.err and "ref1.txt has 60" in r.err

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    r = cli("eval", "bleu", "--hyp", empty, "--ref", d / "ref1.txt")
    assert r.code == 1 and f"{empty}: empty file" in r.err
    r = cli("eval", "bleu", "--hyp", d / "hyp.txt", "--ref", empty)
    assert r.code == 1 and f"{empty}: empty file" in r.err

    bad = write_jsonl(tmp_path / "bad.jsonl", [["fine"], {"refs": "wrong key"}])
    r = cli("eval", "bleu", "--hyp", short, "--ref", bad)
    assert r.code == 1 and f"{bad}:2:" in r.err
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"source": "a", "reference": "b"}, {"source": "c"}])
    r = cli("eval", "bleu", "--model", "nowhere", "--data", pairs)
    assert r.code == 1 and f"{pairs}:2: no 'reference'" in r.err
    r = cli("eval", "bleu", "--hyp", d / "hyp.txt")
    assert r.code == 1 and "--ref" in r.err
    assert all(len(x.strip().splitlines()) == 1 for x in [r.err])
