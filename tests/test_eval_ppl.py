"""`lmforge eval ppl`: sliding-window perplexity against a transformers computation on the same
model and text, the windows against transformers' guide, inputs (text, JSONL, shards), bad input."""

from __future__ import annotations

import json
import math

import pytest

from conftest import write_jsonl
from pplref import guide_scored_positions, hf_sliding_nll


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n,ctx,stride", [(10, 4, 2), (10, 4, 4), (11, 4, 3), (3, 8, 4), (100, 16, 1), (37, 10, 7)])
def test_windows_score_exactly_the_tokens_of_transformers_guide(n, ctx, stride):
    from lmforge.eval.perplexity import windows

    ours = [p for w in windows(n, ctx, stride) for p in range(w.first_scored, w.end)]
    assert ours == guide_scored_positions(n, ctx, stride)
    assert len(ours) == len(set(ours))  # every token at most once
    if stride < ctx:
        assert ours == list(range(1, n))  # every token but the first
    for w in windows(n, ctx, stride):
        assert w.end - w.begin <= ctx and w.begin < w.first_scored


@pytest.fixture(scope="module")
def long_text(stdlib_texts) -> str:
    return stdlib_texts[3][:2200]  # ~1,000 tokens with the 400-token test vocabulary: many windows of 128


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, tiny_model_dir, tiny_gpt2_dir):
    """Both tiny models exported to HF folders, loaded in transformers."""
    import torch
    import transformers

    from lmforge.interop.hf import save_hf_dir
    from lmforge.model.io import load_model_dir
    from lmforge.tokenizer import Tokenizer

    out = {}
    for name, src in (("llama", tiny_model_dir), ("gpt2", tiny_gpt2_dir)):
        model, cfg = load_model_dir(src)
        hf_dir = save_hf_dir(model, cfg, tmp_path_factory.mktemp("hf") / name, tokenizer=Tokenizer.load(src))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        out[name] = (src, hf)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("ctx,stride", [(128, 48), (96, 96)])
def test_ppl_matches_transformers(cli, tmp_path, hf_pair, long_text, family, ctx, stride):
    from lmforge.tokenizer import Tokenizer

    model_dir, hf = hf_pair[family]
    text_file = tmp_path / "text.txt"
    text_file.write_text(long_text, encoding="utf-8")
    ids = Tokenizer.load(model_dir).encode(long_text)
    assert len(ids) > 4 * ctx  # the text is much longer than the context: windowing must handle it

    r = cli("eval", "ppl", model_dir, "--data", text_file, "--context", ctx, "--stride", stride,
            "-o", tmp_path / "ppl.json", "--no-progress")
    assert r.code == 0, r.err
    res = json.loads((tmp_path / "ppl.json").read_text())
    total, count = hf_sliding_nll(hf, ids, ctx, stride)
    assert res["tokens"] == count == (len(ids) - 1 if stride < ctx else len(ids) - math.ceil(len(ids) / ctx))
    assert res["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)  # required: 1e-3
    assert res["nll"] == pytest.approx(total / count, rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(total / math.log(2) / len(long_text.encode()), rel=1e-5)
    assert res["windows"] > 1 and res["settings"] == {**res["settings"], "context": ctx, "stride": stride}
    assert res["data"]["sha256"] and res["lmforge_version"] and res["model"]["tokenizer_sha256"]
    md = (tmp_path / "ppl.md").read_text()
    assert "Perplexity" in md and f"{res['perplexity']:,.4g}" in md and (tmp_path / "ppl.png").stat().st_size > 0


def test_ppl_defaults_jsonl_and_batching_agree(cli, tmp_path, tiny_model_dir, long_text):
    """Defaults (context = the model's, stride = half) and batch sizes change nothing but speed;
    a JSONL of the same text (one document) gives the same figures."""
    from lmforge.eval.perplexity import PerplexityConfig, evaluate_perplexity

    text_file = tmp_path / "t.md"
    text_file.write_text(long_text, encoding="utf-8")
    write_jsonl(tmp_path / "t.jsonl", [{"text": long_text}])
    a = evaluate_perplexity(str(tiny_model_dir), text_file, PerplexityConfig(batch_size=1))
    b = evaluate_perplexity(str(tiny_model_dir), tmp_path / "t.jsonl", PerplexityConfig(batch_size=7))
    assert a["settings"]["context"] == 128 and a["settings"]["stride"] == 64
    assert a["tokens"] == b["tokens"]
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)
    assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=1e-6)
    # Without -o the JSON result goes to stdout.
    r = cli("eval", "ppl", tiny_model_dir, "--data", text_file, "--no-progress")
    assert r.code == 0 and json.loads(r.out)["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)


def test_ppl_on_shards_uses_the_val_split(tmp_path, tiny_model_dir, stdlib_texts):
    import numpy as np

    from lmforge.data.loader import TokenShards
    from lmforge.data.pack import PackConfig, pack_corpus
    from lmforge.eval.perplexity import PerplexityConfig, evaluate_perplexity, load_engine, score_stream

    write_jsonl(tmp_path / "docs.jsonl", [{"text": t[:1500]} for t in stdlib_texts[:20]])
    pack_corpus([str(tmp_path / "docs.jsonl")], tiny_model_dir, tmp_path / "shards",
                PackConfig(val_fraction=0.2, workers=1), progress=False)
    res = evaluate_perplexity(str(tiny_model_dir), tmp_path / "shards", PerplexityConfig(context=64, stride=32))
    val = np.concatenate([np.asarray(s) for s in TokenShards(tmp_path / "shards").split("val").shards]).tolist()
    engine, _ = load_engine(str(tiny_model_dir), "cpu")
    direct = score_stream(engine, val, 64, 32)
    assert res["tokens"] == len(val) - 1 == direct.tokens
    assert res["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)
    assert res["data"]["format"] == "shards" and res["bits_per_byte"] > 0
    assert any("decoded" in n for n in res["notes"])  # says how bytes were counted


def test_perplexity_definition():  # the one the trainer's metrics and every report use
    from lmforge.eval.perplexity import perplexity_from_nll

    assert perplexity_from_nll(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity_from_nll(None) is None and perplexity_from_nll(1e6) == math.inf


def test_ppl_bad_input(cli, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    r = cli("eval", "ppl", tiny_model_dir, "--data", empty, "--no-progress")
    assert r.code == 1 and f"{empty}: empty file" in r.err

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    r = cli("eval", "ppl", tiny_model_dir, "--data", bad, "--no-progress")
    assert r.code == 1 and f"{bad}:2:" in r.err and "'text'" in r.err

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    r = cli("eval", "ppl", tiny_model_dir, "--data", broken, "--no-progress")
    assert r.code == 1 and f"{broken}:2: invalid JSON" in r.err

    ok = tmp_path / "ok.txt"
    ok.write_text("def f(x):\n    return x * 2\n" * 30, encoding="utf-8")
    r = cli("eval", "ppl", tiny_model_dir, "--data", ok, "--context", 32, "--stride", 64, "--no-progress")
    assert r.code == 1 and "--stride" in r.err
    r = cli("eval", "ppl", tiny_model_dir, "--data", ok, "--context", 4096, "--no-progress")
    assert r.code == 1 and "exceeds the model's context of 128" in r.err
    r = cli("eval", "ppl", tiny_model_dir, "--data", tmp_path / "missing.txt", "--no-progress")
    assert r.code == 1 and "missing.txt: no such file" in r.err
    assert len(r.err.strip().splitlines()) == 1  # one line, no traceback


def test_compare_puts_models_side_by_side(cli, tmp_path, tiny_model_dir, tiny_gpt2_dir, long_text):
    """Two models on the same text share a row (best in bold); another text gets its own row;
    the bar chart and markdown are written; a file that is not a result is refused."""
    (tmp_path / "a.txt").write_text(long_text[:1500], encoding="utf-8")
    (tmp_path / "b.txt").write_text(long_text[1500:], encoding="utf-8")
    runs = [("llama-a", tiny_model_dir, "a.txt"), ("gpt2-a", tiny_gpt2_dir, "a.txt"), ("llama-b", tiny_model_dir, "b.txt")]
    for name, model, data in runs:
        r = cli("eval", "ppl", model, "--data", tmp_path / data, "--context", 64, "-o", tmp_path / f"{name}.json", "--no-progress")
        assert r.code == 0, r.err
    r = cli("eval", "compare", *(tmp_path / f"{n}.json" for n, _, _ in runs), "-o", tmp_path / "cmp.json")
    assert r.code == 0, r.err
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    # One column per model: the llama's results on two texts stay one column, on two rows.
    assert cmp["kind"] == "compare" and cmp["models"] == [str(tiny_model_dir), str(tiny_gpt2_dir)]
    ppl_rows = [row for row in cmp["rows"] if row["metric"] == "perplexity"]
    assert len(ppl_rows) == 2  # a.txt (two models) and b.txt (one)
    shared = next(row for row in ppl_rows if len(row["values"]) == 2)
    a = {n: json.loads((tmp_path / f"{n}.json").read_text())["perplexity"] for n, _, _ in runs}
    assert shared["values"] == {str(tiny_model_dir): a["llama-a"], str(tiny_gpt2_dir): a["gpt2-a"]}
    assert shared["best"] == (str(tiny_model_dir) if a["llama-a"] < a["gpt2-a"] else str(tiny_gpt2_dir))
    md = (tmp_path / "cmp.md").read_text()
    assert "**" in md and "a.txt" in md and "b.txt" in md and (tmp_path / "cmp.png").stat().st_size > 1000
    # The same model measured twice on the same thing gets a second column.
    r = cli("eval", "compare", tmp_path / "llama-a.json", tmp_path / "llama-a.json", "-o", tmp_path / "twice.json")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "twice.json").read_text())["models"] == [str(tiny_model_dir), f"{tiny_model_dir} [llama-a]"]
    (tmp_path / "other.json").write_text('{"hello": 1}', encoding="utf-8")
    r = cli("eval", "compare", tmp_path / "other.json")
    assert r.code == 1 and "other.json: not an lmforge eval result" in r.err
