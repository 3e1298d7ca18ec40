"""Encoder-decoder generation through the Engine (lmforge.generate.seq2seq_decode): greedy and
beam search against transformers' MBartForConditionalGeneration.generate on the same random
weights (exported with our own writer), batched (padded) sources equal to each alone, sampling
through the one sampler; then the wiring: pipeline("translation"), `lmforge translate` (text and
file) and `lmforge eval bleu --model` on an encoder-decoder, and the refusals."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
import torch

from conftest import random_seq2seq

from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine
from lmforge.generate.params import SamplingParams
from lmforge.model.config import ModelConfig
from lmforge.model.io import save_model_dir
from lmforge.model.seq2seq import Seq2Seq

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("the cat sat on the mat and the dog ran to the park while a bird sang in the old tree near "
         "our house every morning before the sun came up over the hills").split()
SOURCES = ["the cat sat on the mat", "a bird sang", "the dog ran to the park while a bird sang in the old tree",
           "every morning before the sun came up"]
MAX_NEW = 20


@dataclasses.dataclass
class Setup:
    model: Seq2Seq
    tok: object
    dir: object  # the lmforge model dir
    hf_dir: object  # the same weights as an mBART folder
    sources: list[list[int]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    from lmforge.interop import hf_seq2seq
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    text = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    tok = train_tokenizer(text, TokenizerTrainConfig(vocab_size=300, min_frequency=1, bos_token="<s>",
                                                     eos_token="</s>", pad_token="<pad>", chat_tokens=False),
                          show_progress=False)
    cfg = ModelConfig(name="s2s-translate", arch="encoder-decoder", vocab_size=tok.vocab_size, block_size=48,
                      n_encoder_layer=2, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, intermediate_size=64,
                      norm="layernorm", mlp="gelu_exact", position="learned", bias=True, tie_embeddings=False)
    model = random_seq2seq(cfg, seed=2, head_scale=3.0)  # choices not all near-ties
    root = tmp_path_factory.mktemp("translate")
    out = save_model_dir(model, root / "model", tokenizer=tok)
    hf_dir = hf_seq2seq.save_hf_dir(model, cfg, root / "hf", tokenizer=tok)
    return Setup(model, tok, out, hf_dir, [tok.encode(s) for s in SOURCES])


# -- the Engine against transformers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(setup):
    """(Engine, HF model, end tokens): the end tokens are eos plus the token the model emits third
    most often greedily, so that some hypotheses end and others run to max_new_tokens (and, on
    these weights, early_stopping's three settings give different results)."""
    plain = Engine(setup.model, setup.tok)
    greedy = plain.generate_ids(setup.sources, SamplingParams(max_new_tokens=MAX_NEW, temperature=0))
    frequent = Counter(t for c in greedy for t in c.ids).most_common(3)[2][0]
    engine = Engine(setup.model, setup.tok, stop_token_ids=[frequent])
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(setup.hf_dir, attn_implementation="eager").eval()
    return engine, hf, engine.stop_token_ids


def hf_generate(setup, hf, ends, sources=None, **kw):
    """transformers' generate on the right-padded sources: each sequence's generated ids (the
    decoder start token dropped) cut before the first end token, and whether it had one."""
    sources = sources or setup.sources
    S = max(map(len, sources))
    ids = torch.full((len(sources), S), setup.tok.pad_id)
    mask = torch.zeros((len(sources), S), dtype=torch.long)
    for i, s in enumerate(sources):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=ends, pad_token_id=setup.tok.pad_id,
                          decoder_start_token_id=setup.tok.bos_id, return_dict_in_generate=True, output_scores=True,
                          **kw)
    assert bool((out.sequences[:, 0] == setup.tok.bos_id).all())
    seqs = []
    for row in out.sequences[:, 1:].tolist():
        cut = next((i for i, t in enumerate(row) if t in ends), None)
        seqs.append((row if cut is None else row[:cut], cut is not None))
    scores = out.sequences_scores.tolist() if kw.get("num_beams", 1) > 1 else None
    return seqs, scores


def ours(engine, sources, **kw):
    early = kw.pop("early_stopping", False)
    got = engine.generate_ids(sources, SamplingParams(temperature=0.0, early_stopping=str(early).lower(), **kw))
    return [(c.ids, c.finish_reason == "stop") for c in got], [c.score for c in got]


GRID = [dict(num_beams=4, length_penalty=lp, early_stopping=es, no_repeat_ngram_size=ng, num_return_sequences=n)
        for lp in (0.6, 1.0, 2.0) for es in (True, False, "never") for ng in (0, 2) for n in (1, 3)]


def test_greedy_and_beam_search_equal_transformers_generate(setup, pair):
    engine, hf, ends = pair
    assert engine.decoder_start_id == setup.tok.bos_id
    ended = by_length = 0
    outcomes: dict[tuple, set] = {}
    for kw in [dict(num_beams=1), dict(num_beams=1, no_repeat_ngram_size=2), dict(num_beams=1, min_new_tokens=5),
               dict(num_beams=3, min_new_tokens=4, num_return_sequences=2)] + GRID:
        want, want_scores = hf_generate(setup, hf, ends, max_new_tokens=MAX_NEW, **kw)
        got, scores = ours(engine, setup.sources, max_new_tokens=MAX_NEW, **kw)
        assert got == want, kw
        if want_scores is not None:
            assert scores == pytest.approx(want_scores, abs=1e-4), kw
        ended += sum(e for _, e in got)
        by_length += sum(not e for _, e in got)
        outcomes.setdefault(tuple((k, v) for k, v in kw.items() if k != "early_stopping"), set()).add(str(got))
    # The grid reaches what it should: hypotheses ending on an end token and at max_new_tokens,
    # and early_stopping settings that change the result.
    assert ended >= 10 and by_length >= 10, (ended, by_length)
    assert max(len(v) for v in outcomes.values()) >= 2


def test_repetition_penalty_reads_the_decoder_input_as_transformers(setup, pair):
    engine, hf, ends = pair
    for kw in (dict(num_beams=1), dict(num_beams=4, num_return_sequences=2)):
        want, want_scores = hf_generate(setup, hf, ends, max_new_tokens=MAX_NEW, repetition_penalty=1.5, **kw)
        got, scores = ours(engine, setup.sources, max_new_tokens=MAX_NEW, repetition_penalty=1.5, **kw)
        assert got == want, kw


def test_a_source_in_a_padded_batch_gives_what_it_gives_alone(setup, pair):
    engine = pair[0]
    for params in (SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW),
                   SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, num_beams=4, num_return_sequences=2,
                                  no_repeat_ngram_size=2, length_penalty=1.5)):
        batched = engine.generate_ids(setup.sources, params)
        n = params.num_return_sequences
        for i, src in enumerate(setup.sources):
            alone = engine.generate_ids([src], params)
            group = batched[i * n : (i + 1) * n]
            assert [c.ids for c in alone] == [c.ids for c in group]
            assert all(c.prompt_ids == src and c.text == setup.tok.decode(c.ids) for c in group)
            if params.beam:
                assert [c.score for c in alone] == pytest.approx([c.score for c in group], abs=1e-5)


def test_sampling_goes_through_the_one_sampler(setup, pair):
    engine = pair[0]
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.2, top_k=20, top_p=0.9, seed=7, ignore_eos=True,
                            num_return_sequences=2)
    a = engine.generate_ids(setup.sources[:2], params)
    b = engine.generate_ids(setup.sources[:2], params)
    assert [c.ids for c in a] == [c.ids for c in b] and all(len(c.ids) == MAX_NEW for c in a)
    other = engine.generate_ids(setup.sources[:2], dataclasses.replace(params, seed=8))
    assert [c.ids for c in other] != [c.ids for c in a]
    greedy = engine.generate_ids(setup.sources[:1], SamplingParams(temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True))
    assert a[0].ids != greedy[0].ids  # sampled, not argmax
    # top_k=1 is greedy whatever the temperature: the sampler, not a separate path, picks.
    k1 = engine.generate_ids(setup.sources[:1], SamplingParams(temperature=1.5, top_k=1, seed=1, max_new_tokens=MAX_NEW,
                                                               ignore_eos=True))
    assert k1[0].ids == greedy[0].ids
    # Streaming gives the greedy text in pieces.
    stream = "".join(engine.stream_ids(setup.sources[0], SamplingParams(temperature=0, max_new_tokens=MAX_NEW)))
    assert stream == engine.generate_ids(setup.sources[:1], SamplingParams(temperature=0, max_new_tokens=MAX_NEW))[0].text


def test_the_encoder_runs_once_per_source_and_cross_keys_once(setup, pair, monkeypatch):
    engine = pair[0]
    calls = Counter()
    model = setup.model
    encode, kv = model.encode, model.decoder.blocks[0].cross_attn.keys_values

    def counting_encode(src, mask=None):
        calls["encode_rows"] += src.shape[0]
        return encode(src, mask)

    def counting_kv(memory):
        calls["cross_rows"] += memory.shape[0]
        return kv(memory)

    monkeypatch.setattr(model, "encode", counting_encode)
    monkeypatch.setattr(model.decoder.blocks[0].cross_attn, "keys_values", counting_kv)
    engine.generate_ids(setup.sources, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, num_beams=4))
    assert calls == {"encode_rows": len(SOURCES), "cross_rows": len(SOURCES)}


def test_refusals(setup, pair):
    engine = pair[0]
    src = setup.sources[0]
    with pytest.raises(LmforgeError, match="source of 49 tokens exceeds the model's block_size 48"):
        engine.generate_ids([[5] * 49], SamplingParams(temperature=0, max_new_tokens=4))
    with pytest.raises(LmforgeError, match="max_new_tokens 49 exceeds the decoder's block_size 48"):
        engine.check_length(src, SamplingParams(temperature=0, max_new_tokens=49))
    with pytest.raises(LmforgeError, match="source is never cut"):
        engine.check_length(src, SamplingParams(temperature=0, max_new_tokens=4), "left")
    with pytest.raises(LmforgeError, match="empty source"):
        engine.encode("")
    with pytest.raises(LmforgeError, match="score is for decoder-only models"):
        engine.score([src])
    with pytest.raises(LmforgeError, match="chat is for decoder-only models"):
        from lmforge.generate.chat_session import ChatSession

        ChatSession(engine, SamplingParams(temperature=0))
    with pytest.raises(LmforgeError, match="continuous batching"):
        from lmforge.generate.batcher import ContinuousBatcher

        ContinuousBatcher(engine)
    with pytest.raises(LmforgeError, match="int8_activations is for quantized decoder-only"):
        Engine(setup.model, setup.tok, int8_activations=True)
    with pytest.raises(LmforgeError, match="decoder_start_token_id 999 is outside"):
        Engine(setup.model, setup.tok, decoder_start_id=999)
    with pytest.raises(LmforgeError, match="stop strings are not supported with beam search"):
        engine.generate_ids([src], SamplingParams(temperature=0, max_new_tokens=4, num_beams=2, stop=["x"]))


# -- pipeline("translation"), `lmforge translate`, `lmforge eval bleu --model` ------------------------
def _greedy(setup, texts, **kw):
    engine = Engine(setup.model, setup.tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=kw.pop("max_new_tokens", MAX_NEW), **kw)
    return [[c.text.strip() for c in engine.generate_ids([engine.encode(t)], params)] for t in texts]


def test_pipeline_translation_in_transformers_call_shape(setup):
    import lmforge

    tr = lmforge.pipeline("translation", model=str(setup.dir))
    (want,) = _greedy(setup, SOURCES[:1], max_new_tokens=8)
    assert tr(SOURCES[0], max_new_tokens=8) == [{"translation_text": want[0]}]
    batch = tr(SOURCES, max_new_tokens=8, batch_size=3)  # one dict per source, in order
    assert batch == [{"translation_text": t[0]} for t in _greedy(setup, SOURCES, max_new_tokens=8)]
    beams = tr(SOURCES[:2], max_new_tokens=8, num_beams=4, num_return_sequences=2, length_penalty=0.5)
    want = _greedy(setup, SOURCES[:2], max_new_tokens=8, num_beams=4, num_return_sequences=2, length_penalty=0.5)
    assert beams == [[{"translation_text": t} for t in group] for group in want]
    sampled = tr(SOURCES[:2], max_new_tokens=8, do_sample=True, seed=3)
    assert sampled == tr(SOURCES[:2], max_new_tokens=8, do_sample=True, seed=3)
    with pytest.raises(LmforgeError, match="unknown generation arguments: src_lang"):
        tr("x", src_lang="en")
    with pytest.raises(LmforgeError, match="source 2 is empty"):
        tr(["the cat", " "])
    with pytest.raises(LmforgeError, match="use pipeline\\('translation'"):
        lmforge.pipeline("text-generation", model=str(setup.dir))


def test_pipeline_translation_refuses_a_decoder_only_model(tiny_model_dir):
    import lmforge

    with pytest.raises(LmforgeError, match="translation needs an encoder-decoder model"):
        lmforge.pipeline("translation", model=str(tiny_model_dir))
    from lmforge.generate.translate import translate_texts
    from lmforge.interop.registry import load_model

    engine = Engine.for_loaded(load_model(tiny_model_dir))
    with pytest.raises(LmforgeError, match="translation needs an encoder-decoder model"):
        translate_texts(engine, ["x"], SamplingParams(temperature=0))


def test_eval_bleu_with_beams_on_a_decoder_only_model(tiny_model_dir, tmp_path):
    """--num-beams on a decoder-only model: the best beam, cut at the first stop string after the search."""
    from lmforge.eval.bleu import BleuGenerateConfig, generate_and_score
    from lmforge.interop.registry import load_model

    pairs = [{"source": "def f(x):", "reference": "return x"}, {"source": "class A:", "reference": "pass"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    r = generate_and_score(str(tiny_model_dir), tmp_path / "p.jsonl", BleuGenerateConfig(max_new_tokens=6, num_beams=3))
    engine = Engine.for_loaded(load_model(tiny_model_dir))
    want = [engine.beam_search([engine.encode(p["source"])], SamplingParams(temperature=0, max_new_tokens=6,
                                                                            num_beams=3))[0][0].text for p in pairs]
    assert r["details"]["hypotheses"] == [w.split("\n")[0].strip() for w in want]
    assert r["settings"]["decoding"] == "beam search (3 beams)" and r["settings"]["architecture"] == "decoder"


def test_cli_translate_text_and_file(setup, cli, tmp_path):
    (want,) = _greedy(setup, SOURCES[:1], max_new_tokens=8)
    r = cli("translate", setup.dir, SOURCES[0], "--max-new-tokens", 8)
    assert r.code == 0, r.err
    assert r.out == want[0] + "\n"
    r = cli("translate", setup.dir, SOURCES[0], "--max-new-tokens", 8, "--num-beams", 3, "--num-return-sequences", 2)
    beams = _greedy(setup, SOURCES[:1], max_new_tokens=8, num_beams=3, num_return_sequences=2)[0]
    assert r.code == 0 and r.out == f"=== translation 1 of 2 ===\n{beams[0]}\n=== translation 2 of 2 ===\n{beams[1]}\n"
    # A file: one source per line, a blank line kept blank, batched in any batch size alike.
    lines = [SOURCES[2], SOURCES[0], "", SOURCES[1], SOURCES[3]]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    want = ["" if not line else t[0] for line, t in zip(lines, _greedy(setup, [x or "x" for x in lines], max_new_tokens=8))]
    r = cli("translate", setup.dir, "--input", tmp_path / "in.txt", "--output", tmp_path / "out.txt",
            "--max-new-tokens", 8, "--batch-size", 2)
    assert r.code == 0, r.err
    assert (tmp_path / "out.txt").read_text() == "".join(w + "\n" for w in want)
    assert "wrote 5 translations" in r.err
    r = cli("translate", setup.dir, "-i", tmp_path / "in.txt", "--max-new-tokens", 8)
    assert r.code == 0 and r.out == "".join(w + "\n" for w in want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]  # no temp file left
    # `lmforge generate` runs an encoder-decoder through the same Engine (text-to-text).
    r = cli("generate", setup.dir, SOURCES[0], "--temperature", 0, "--max-new-tokens", 8, "--no-stream")
    assert r.code == 0 and r.out == _greedy(setup, SOURCES[:1], max_new_tokens=8)[0][0] + "\n"


def test_cli_translate_errors_are_one_line(setup, cli, tmp_path, tiny_model_dir):
    (tmp_path / "in.txt").write_text("the cat\n")
    cases = [
        (("translate", setup.dir), "give the TEXT to translate or --input FILE"),
        (("translate", setup.dir, "x", "--input", tmp_path / "in.txt"), "not both"),
        (("translate", setup.dir, "x", "--output", tmp_path / "o.txt"), "--output goes with --input FILE"),
        (("translate", setup.dir, "x", "--max-new-tokens", 100), "max_new_tokens 100 exceeds the decoder's block_size 48"),
        (("translate", setup.dir, "x", "--num-beams", 2, "--temperature", 0.5), "beam search is deterministic"),
        (("translate", setup.dir, "-i", tmp_path / "in.txt", "--num-beams", 2, "--num-return-sequences", 2),
         "one translation per line"),
        (("translate", tiny_model_dir, "x"), "translation needs an encoder-decoder model, or a decoder-only one trained on"),
        (("translate", setup.dir, "-i", tmp_path / "missing.txt"), "missing.txt"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.code != 0 and message in r.err, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "o.txt").exists()


def test_eval_bleu_with_an_encoder_decoder(setup, cli, tmp_path):
    from sacrebleu.metrics import BLEU, CHRF

    from lmforge.eval.bleu import BleuGenerateConfig, generate_and_score

    refs = ["the cat sat on a mat", "a bird sang", "the dog ran to the old park", "every morning the sun came up"]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for s, r in zip(SOURCES, refs):
            f.write(json.dumps({"translation": {"en": s, "xx": r}}) + "\n")
    cfg = dict(max_new_tokens=8, source_field="translation.en", target_field="translation.xx", num_beams=3)
    a = generate_and_score(str(setup.dir), tmp_path / "pairs.jsonl", BleuGenerateConfig(batch_size=1, **cfg))
    b = generate_and_score(str(setup.dir), tmp_path / "pairs.jsonl", BleuGenerateConfig(batch_size=3, **cfg))
    hyps = [t[0].split("\n")[0].strip() for t in _greedy(setup, SOURCES, max_new_tokens=8, num_beams=3)]
    assert a["details"]["hypotheses"] == b["details"]["hypotheses"] == hyps
    # The scores are sacrebleu's on the same hypotheses.
    assert a["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score, abs=1e-9)
    assert a["chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score, abs=1e-9)
    s = a["settings"]
    assert s["architecture"] == "encoder-decoder" and s["num_beams"] == 3 and s["decoding"] == "beam search (3 beams)"
    # The command: --limit, the fields, --num-beams; the result JSON written like the other evals.
    r = cli("eval", "bleu", "--model", setup.dir, "--data", tmp_path / "pairs.jsonl", "--source-field", "translation.en",
            "--target-field", "translation.xx", "--num-beams", 3, "--max-new-tokens", 8, "--limit", 2,
            "--out", tmp_path / "r.json")
    assert r.code == 0, r.err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["segments"] == 2 and result["details"]["hypotheses"] == hyps[:2]
    assert f"BLEU {result['bleu']:.2f}" in r.out
    r = cli("eval", "bleu", "--model", setup.dir, "--data", tmp_path / "pairs.jsonl", "--source-field", "src")
    assert r.code != 0 and "expected an object with a string 'src'" in r.err
    r = cli("eval", "bleu", "--model", setup.dir, "--data", tmp_path / "pairs.jsonl", "--source-field", "translation.en")
    assert r.code != 0 and "no 'reference'" in r.err
