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


def random_seq2seq(cfg: ModelConfig, seed: int = 0) -> Seq2Seq:
    """Every weight perturbed, the head scaled up so that choices are not all near-ties."""
    torch.manual_seed(seed)
    model = Seq2Seq(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(3.0)
    return model.eval()


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
    model = random_seq2seq(cfg, seed=2)
    root = tmp_path_factory.mktemp("translate")
    out = save_model_dir(model, root / "model", tokenizer=tok)
    hf_dir = hf_seq2seq.save_hf_dir(model, cfg, root / "hf", tokenizer=tok)
    return Setup(model, tok, out, hf_dir, [tok.encode(s) for s in SOURCES])


# -- the Engine against transformers ---------------------------------------------------------------
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(setup):
    """(Engine, HF model, end tokens): the end tokens are eos plus the token the model emits third
    most often greedily, so that some hypotheses end and others run to max_new_tokens (and, on
    these weights, early_stopping's three settings give different results)."""
    plain = Engine(setup.model, setup.tok)
    greedy = plain.generate_ids(setup.sources, SamplingParams(max_new_tokens=MAX_NEW, temperature=0))
    frequent = Counter(t for c in greedy for t in c.ids).most_common(3)[2][0]
    engine = Engine(setup.model, setup.tok, stop_token_ids=[frequent])
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
