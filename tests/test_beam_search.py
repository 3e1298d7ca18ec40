"""Beam search (lmforge.generate.beam, Engine.beam_search): the algorithm on a hand-built step
function whose answers are worked out below, then the Engine against transformers'
generate(num_beams=...) on the same random weights (GPT-2 and Llama shapes, exported with our own
writer): the same token ids and the same sequences_scores, for a batch of prompts of different
lengths; and the wiring (CLI, pipeline, chat, refusals)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch

from conftest import random_model
from lmforge.errors import LmforgeError
from lmforge.generate.beam import BeamSettings, beam_search, ngram_ban_mask
from lmforge.generate.engine import Engine
from lmforge.generate.params import SamplingParams
from lmforge.model.config import ModelConfig
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# -- the algorithm on a hand-built step ------------------------------------------------------
# Four tokens: E (the end token), A, B, C. The next token's probabilities depend on the last
# token alone (a Markov chain), so every score below is a sum of logs of these numbers.
E, A, B, C = 0, 1, 2, 3
CHAIN = {
    None: {E: 0.2, A: 0.7, B: 0.06, C: 0.04},  # after the prompt
    A: {E: 0.5, A: 0.3, B: 0.15, C: 0.05},
    B: {E: 0.04, A: 0.06, B: 0.7, C: 0.2},
    C: {E: 0.7, A: 0.06, B: 0.2, C: 0.04},
}


def _row(last) -> torch.Tensor:
    return torch.tensor([math.log(CHAIN[last][t]) for t in range(4)])  # log-probs: log_softmax keeps them


def _search(length_penalty: float, early_stopping, max_new_tokens: int = 6):
    """Beam search with 2 beams, returning both hypotheses; the step function keeps each row's
    tokens by following `parents`, as a model's cache would, and reads the last one."""
    rows: list[list[int]] = [[], []]
    seen: list[list[int]] = []

    def step(tokens, parents):
        nonlocal rows
        rows = [rows[int(p)] + [int(t)] for p, t in zip(parents, tokens)]
        seen.extend(rows)
        return torch.stack([_row(r[-1]) for r in rows])

    settings = BeamSettings(num_beams=2, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                            early_stopping=early_stopping, num_return_sequences=2, end_ids=(E,))
    (found,) = beam_search(_row(None)[None], step, settings)
    for h in found:  # every hypothesis is a row the step function built, plus its last token
        assert h.ids[:-1] in seen or len(h.ids) == 1
    return [(h.ids, h.ended) for h in found], [h.score for h in found], len(seen) // 2


def _log(*ps: float) -> float:
    return math.log(math.prod(ps))


# The search, step by step (scores are sums of log-probs; K = 4 candidates a step since there is
# one end token; "ends" = the candidate ends on E; only ending candidates among the best 2 can be
# finished hypotheses, scored sum / length ** length_penalty):
#   step 1: only beam 0 competes: A -0.357, E -1.609, B -2.813, C -3.219 -> "E" finishes (2nd best;
#           length 1); A and B run.
#   step 2: AE -1.050, AA -1.561, AB -2.254, BB -3.170 -> "AE" finishes (length 2); AA, AB run.
#           Two finished: early_stopping=True stops here -> [AE, E].
#   step 3: AAE -2.254, ABB -2.611, AAA -2.765, AAB -3.458 -> "AAE" finishes; ABB, AAA run.
#           length_penalty 1: finished AE -0.525, AAE -0.751 (E's -1.609 drops out). The best
#           running beam, ABB, scores -2.611 / 3 = -0.870 at its length: False stops -> [AE, AAE];
#           "never" scores it at max_new_tokens, -2.611 / 6 = -0.435 > -0.751, and goes on.
#   steps 4-5: AAAE (-3.458 / 4 = -0.865) and the others score below -0.751; the running ABBB..
#           beam at -2.968 / 6 and -3.325 / 6 can still win, so "never" goes on to the end:
#   step 6 (max_new_tokens: every candidate ends): ABBBBB -3.682 / 6 = -0.614 > -0.751 -> [AE, ABBBBB].
def test_early_stopping_true_false_never_worked_out_by_hand():
    ae, e = _log(0.7, 0.5), _log(0.2)
    aae = _log(0.7, 0.3, 0.5)
    abbbbb = _log(0.7, 0.15, 0.7, 0.7, 0.7, 0.7)

    got, scores, steps = _search(1.0, True)
    assert got == [([A, E], True), ([E], True)] and steps == 1
    assert scores == pytest.approx([ae / 2, e / 1], abs=1e-5)

    got, scores, steps = _search(1.0, False)
    assert got == [([A, E], True), ([A, A, E], True)] and steps == 2
    assert scores == pytest.approx([ae / 2, aae / 3], abs=1e-5)

    got, scores, steps = _search(1.0, "never")
    assert got == [([A, E], True), ([A, B, B, B, B, B], False)] and steps == 5
    assert scores == pytest.approx([ae / 2, abbbbb / 6], abs=1e-5)


# The length penalty, with early_stopping=False, same chain:
#   0: scores are plain sums. Step 2: finished AE -1.050, E -1.609; the best running beam AA
#      (-1.561) could still beat E, so on. Step 3: AAE (-2.254) loses to both; the best running
#      beam ABB (-2.611) cannot beat -1.609 any more: stop -> [AE, E].
#   2: step 2: AE -1.050 / 4 = -0.2625, E -1.609; AA -1.561 / 4 = -0.390 could beat E: on.
#      Step 3: AAE -2.254 / 9 = -0.2504 beats AE: [AAE, AE]; ABB -2.611 / 9 = -0.290 cannot beat
#      -0.2625: stop. A longer hypothesis wins with a larger penalty exponent.
def test_length_penalty_worked_out_by_hand():
    ae, e, aae = _log(0.7, 0.5), _log(0.2), _log(0.7, 0.3, 0.5)
    got, scores, steps = _search(0.0, False)
    assert got == [([A, E], True), ([E], True)] and steps == 2
    assert scores == pytest.approx([ae, e], abs=1e-5)
    got, scores, steps = _search(2.0, False)
    assert got == [([A, A, E], True), ([A, E], True)] and steps == 2
    assert scores == pytest.approx([aae / 9, ae / 4], abs=1e-5)


def test_max_new_tokens_one_and_the_settings_checks():
    (found,) = beam_search(_row(None)[None], lambda t, p: pytest.fail("no step after the last token"),
                           BeamSettings(num_beams=2, max_new_tokens=1, num_return_sequences=2, end_ids=(E,)))
    assert [(h.ids, h.ended) for h in found] == [([A], False), ([E], True)]
    with pytest.raises(LmforgeError, match=r"num_return_sequences must be in \[1, num_beams=2\]"):
        BeamSettings(num_beams=2, max_new_tokens=4, num_return_sequences=3)
    with pytest.raises(LmforgeError, match="early_stopping must be True, False or 'never'"):
        BeamSettings(num_beams=2, max_new_tokens=4, early_stopping="sometimes")
    with pytest.raises(LmforgeError, match="more than the vocabulary of 4"):
        beam_search(_row(None)[None], None, BeamSettings(num_beams=3, max_new_tokens=4, end_ids=(E,)))


def test_ngram_ban_mask():
    history = torch.tensor([[1, 2, 3, 1, 2, 7, 1], [1, 2, 5, 1, 2, 4, 1]])
    # n = 3 on "1 2 3 1 2": after the prefix "1 2" came 3 -> 3 is banned. Row 1, "1 2 5 1 2": 5,
    # unless its first two tokens are left padding (start 2): its own "5 1 2" has no "1 2 x".
    mask = ngram_ban_mask(history[:, :5], 3, 8)
    assert [m.nonzero().flatten().tolist() for m in mask] == [[3], [5]]
    mask = ngram_ban_mask(history[:, :5], 3, 8, start=torch.tensor([0, 2]))
    assert [m.nonzero().flatten().tolist() for m in mask] == [[3], []]
    # n = 2 on the whole rows: after "1" came 2 in both (row 1: within its own 5 1 2 4 1).
    mask = ngram_ban_mask(history, 2, 8, start=torch.tensor([0, 2]))
    assert [m.nonzero().flatten().tolist() for m in mask] == [[2], [2]]
    # A prefix reaching into the padding bans nothing; nor does a row shorter than n.
    assert ngram_ban_mask(history, 3, 8, start=torch.tensor([0, 6])) is None
    assert ngram_ban_mask(history[:, :2], 3, 8) is None


def test_kv_cache_reorder_in_place():
    from lmforge.model.gpt import KVCache

    cfg = ModelConfig(name="t", vocab_size=10, block_size=8, n_layer=2, n_head=2, n_kv_head=1, n_embd=8,
                      intermediate_size=16)
    cache = KVCache(cfg, 3, 6)
    cache.k.normal_(), cache.v.normal_()
    cache.pos = 4
    before_k, before_v, k_id = cache.k.clone(), cache.v.clone(), cache.k.data_ptr()
    cache.reorder(torch.tensor([2, 0, 0]))
    assert torch.equal(cache.k[:, :, :, :4], before_k[:, [2, 0, 0], :, :4])
    assert torch.equal(cache.v[:, :, :, :4], before_v[:, [2, 0, 0], :, :4])
    assert torch.equal(cache.k[:, :, :, 4:], before_k[:, :, :, 4:])  # beyond pos: untouched
    assert cache.k.data_ptr() == k_id


# -- the Engine against transformers ---------------------------------------------------------
transformers = pytest.importorskip("transformers")

SHAPES = {
    "gpt2": dict(norm="layernorm", mlp="gelu", position="learned", bias=True, n_kv_head=4),
    "llama": dict(n_kv_head=2),  # rmsnorm, swiglu, rope, grouped-query attention
}
LENGTHS = (5, 9, 2)  # one batch, left-padded
MAX_NEW = 16


@dataclasses.dataclass
class Pair:
    engine: Engine
    hf: object
    prompts: list[list[int]]
    ends: list[int]


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tiny_gpt2_dir, tmp_path_factory):
    """A random lmforge model (its head scaled up, so its choices are not all near-ties) and the
    same weights in transformers; the end tokens are the Engine's (eos, <|im_end|>) plus the
    token the model emits most often greedily, so that some beams end and others run on."""
    from lmforge.interop.hf import save_hf_dir

    tok = Tokenizer.load(tiny_gpt2_dir)
    cfg = ModelConfig(name=request.param, vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64,
                      intermediate_size=128, tie_embeddings=False, **SHAPES[request.param])
    model = random_model(cfg, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, tok.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    plain = Engine(model, tok)
    plain.backend = "torch"
    greedy = plain.generate_ids(prompts, SamplingParams(max_new_tokens=MAX_NEW, temperature=0))
    frequent = Counter(t for c in greedy for t in c.ids).most_common(1)[0][0]
    engine = Engine(model, tok, stop_token_ids=[frequent])
    engine.backend = "torch"
    assert not set(engine.stop_token_ids) & {t for p in prompts for t in p}  # the pad id is no prompt token
    out = save_hf_dir(model, cfg, tmp_path_factory.mktemp("beam") / request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    return Pair(engine, hf, prompts, engine.stop_token_ids)


def hf_generate(p: Pair, pad_with_first: bool = False, **kw) -> tuple[list[tuple[list[int], bool]], list[float] | None]:
    """transformers' generate on the same left-padded batch and attention mask as the Engine's;
    each sequence's generated ids cut before its first end token, and whether it had one."""
    L = max(map(len, p.prompts))
    ids = torch.full((len(p.prompts), L), p.ends[0])
    mask = torch.zeros((len(p.prompts), L), dtype=torch.long)
    for i, prompt in enumerate(p.prompts):
        ids[i, L - len(prompt):], mask[i, L - len(prompt):] = torch.tensor(prompt), 1
        if pad_with_first:  # transformers' penalty reads the pads as tokens: pad with one of the row's own
            ids[i, : L - len(prompt)] = prompt[0]
    with torch.no_grad():
        out = p.hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=p.ends, pad_token_id=p.ends[0],
                            return_dict_in_generate=True, output_scores=True, **kw)
    seqs = []
    for row in out.sequences[:, L:].tolist():
        cut = next((i for i, t in enumerate(row) if t in p.ends), None)
        seqs.append((row if cut is None else row[:cut], cut is not None))
    scores = out.sequences_scores.tolist() if kw.get("num_beams", 1) > 1 else None
    return seqs, scores


def ours(p: Pair, **kw):
    early = kw.pop("early_stopping", False)
    params = SamplingParams(temperature=0.0, early_stopping=str(early).lower(), **kw)
    got = p.engine.generate_ids(p.prompts, params)
    return [(c.ids, c.finish_reason == "stop") for c in got], [c.score for c in got]


def _compare(p: Pair, **kw):
    want, want_scores = hf_generate(p, **kw)
    got, scores = ours(p, **kw)
    assert got == want, kw
    if want_scores is not None:
        assert scores == pytest.approx(want_scores, abs=1e-4), kw
    return got


GRID = [dict(num_beams=nb, length_penalty=lp, early_stopping=es, no_repeat_ngram_size=ng, num_return_sequences=n)
        for nb in (3, 4) for lp in (0.6, 1.0, 2.0) for es in (True, False, "never") for ng in (0, 2) for n in (1, 2)]


def test_same_sequences_and_scores_as_transformers(pair):
    outcomes: dict[tuple, set] = {}
    ended = by_length = 0
    for kw in [dict(num_beams=1), dict(num_beams=1, no_repeat_ngram_size=2)] + GRID:
        got = _compare(pair, max_new_tokens=MAX_NEW, **kw)
        ended += sum(e for _, e in got)
        by_length += sum(not e for _, e in got)
        key = tuple((k, v) for k, v in kw.items() if k != "early_stopping")
        outcomes.setdefault(key, set()).add(str(got))
    # The grid covers what it means to: hypotheses ending on an end token and at max_new_tokens,
    # and early_stopping settings that give different results on this model.
    assert ended >= 10 and by_length >= 10, (ended, by_length)
    assert max(len(v) for v in outcomes.values()) >= (3 if pair.engine.config.name == "gpt2" else 2)


def test_penalties_and_min_new_tokens_as_transformers(pair):
    _compare(pair, max_new_tokens=MAX_NEW, num_beams=3, min_new_tokens=6, num_return_sequences=3)
    _compare(pair, max_new_tokens=MAX_NEW, num_beams=4, no_repeat_ngram_size=3, early_stopping="never",
             length_penalty=1.5)
    # The repetition penalty applies to log-probabilities in transformers' beam search.
    want, want_scores = hf_generate(pair, pad_with_first=True, max_new_tokens=MAX_NEW, num_beams=3,
                                    repetition_penalty=1.3, num_return_sequences=2)
    got, scores = ours(pair, max_new_tokens=MAX_NEW, num_beams=3, repetition_penalty=1.3, num_return_sequences=2)
    assert got == want and scores == pytest.approx(want_scores, abs=1e-4)


def test_numpy_decoder_steps_give_the_same_search(pair):
    """Decode steps in the numpy decoder (where the Engine measured it faster) reorder the same
    cache rows in place: the same sequences as transformers'."""
    pair.engine.backend = "numpy"
    try:
        for kw in (dict(num_beams=4, num_return_sequences=2), dict(num_beams=3, early_stopping="never",
                                                                   length_penalty=2.0, no_repeat_ngram_size=2)):
            _compare(pair, max_new_tokens=MAX_NEW, **kw)
    finally:
        pair.engine.backend = "torch"


def test_a_prompt_searched_in_a_batch_gives_what_it_gives_alone(pair):
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, num_beams=4, num_return_sequences=3,
                            no_repeat_ngram_size=2, repetition_penalty=1.2)
    batched = pair.engine.beam_search(pair.prompts, params)
    for prompt, group in zip(pair.prompts, batched):
        (alone,) = pair.engine.beam_search([prompt], params)
        assert [c.ids for c in alone] == [c.ids for c in group]
        assert [c.score for c in alone] == pytest.approx([c.score for c in group], abs=1e-5)
        assert all(c.prompt_ids == prompt and c.text == pair.engine.tokenizer.decode(c.ids) for c in group)


def test_no_repeat_ngram_without_beams_when_sampling(pair):
    got = pair.engine.generate_ids(pair.prompts, SamplingParams(max_new_tokens=MAX_NEW, temperature=1.5, top_k=0,
                                                                seed=0, no_repeat_ngram_size=2, ignore_eos=True))
    for prompt, c in zip(pair.prompts, got):
        seq = prompt + c.ids
        pairs = list(zip(seq, seq[1:]))
        assert len(pairs) == len(set(pairs))


# -- wiring -------------------------------------------------------------------------------
def test_refusals(pair):
    e, prompt = pair.engine, pair.prompts[0]
    beams = dict(temperature=0.0, max_new_tokens=4, num_beams=2)
    with pytest.raises(LmforgeError, match="beam search cannot stream"):
        list(e.stream_ids(prompt, SamplingParams(**beams)))
    with pytest.raises(LmforgeError, match="stop strings are not supported with beam search"):
        e.generate_ids([prompt], SamplingParams(**beams, stop=["x"]))
    with pytest.raises(LmforgeError, match="presence_penalty / frequency_penalty apply to sampling"):
        e.generate_ids([prompt], SamplingParams(**beams, presence_penalty=0.5))
    with pytest.raises(LmforgeError, match="beam search is deterministic: num_beams 2 with temperature 0.7"):
        SamplingParams(max_new_tokens=4, num_beams=2, temperature=0.7)
    with pytest.raises(LmforgeError, match=r"num_return_sequences \(3\) must be <= num_beams \(2\)"):
        SamplingParams(**beams, num_return_sequences=3)
    with pytest.raises(LmforgeError, match="greedy decoding returns one sequence"):
        SamplingParams(temperature=0.0, num_return_sequences=2)
    with pytest.raises(LmforgeError, match="early_stopping must be true, false or never, got 'soon'"):
        SamplingParams(**beams, early_stopping="soon")
    assert SamplingParams(**beams, early_stopping=True).early_stopping_value is True
    assert SamplingParams(**beams, early_stopping="NEVER").early_stopping_value == "never"
    from lmforge.generate.batcher import ContinuousBatcher

    with pytest.raises(LmforgeError, match="the batcher decodes one sequence per request"):
        ContinuousBatcher(e, max_batch=2, max_len=32).submit(prompt, SamplingParams(**beams))


def test_sampling_with_num_return_sequences_gives_that_many_per_prompt(pair):
    got = pair.engine.generate_ids(pair.prompts[:2], SamplingParams(max_new_tokens=4, temperature=1.0, seed=3,
                                                                    num_return_sequences=3))
    assert [c.prompt_ids for c in got] == [pair.prompts[0]] * 3 + [pair.prompts[1]] * 3


def test_cli_generate_with_beams(cli, tiny_model_dir):
    from lmforge.interop.registry import load_model

    loaded = load_model(tiny_model_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    ids = engine.encode("def f(x):")
    (want,) = engine.beam_search([ids], SamplingParams(temperature=0.0, max_new_tokens=6, num_beams=3,
                                                       num_return_sequences=2, length_penalty=0.5))
    # --num-beams needs no --temperature 0: the default temperature is not applied to a beam search.
    r = cli("generate", tiny_model_dir, "def f(x):", "--max-new-tokens", 6, "--num-beams", 3,
            "--num-return-sequences", 2, "--length-penalty", 0.5, "--early-stopping", "false")
    assert r.code == 0, r.err
    lines = r.out.split("\n")
    assert lines[0] == f"=== sequence 1 of 2, score {want[0].score:.4f} ==="
    assert r.out.startswith(f"=== sequence 1 of 2, score {want[0].score:.4f} ===\n{want[0].text}\n"
                            f"=== sequence 2 of 2, score {want[1].score:.4f} ===\n{want[1].text}\n")
    r = cli("generate", tiny_model_dir, "def f(x):", "--max-new-tokens", 6, "--num-beams", 3)
    assert r.code == 0 and r.out == want[0].text + "\n"
    r = cli("generate", tiny_model_dir, "x", "--num-beams", 3, "--temperature", 0.7)
    assert r.code != 0 and "beam search is deterministic" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("generate", tiny_model_dir, "x", "--max-new-tokens", 4, "--num-beams", 3, "--stream")
    assert r.code != 0 and "beam search cannot stream" in r.err


def test_pipeline_and_chat_with_beams(tiny_model_dir):
    import lmforge
    from lmforge.generate.chat_session import ChatSession

    gen = lmforge.pipeline("text-generation", model=str(tiny_model_dir))
    out = gen(["def f(x):", "class A:"], max_new_tokens=6, num_beams=4, num_return_sequences=2, return_full_text=False)
    assert [len(x) for x in out] == [2, 2]
    want = gen.engine.beam_search([gen.engine.encode("def f(x):")], SamplingParams(
        temperature=0.0, max_new_tokens=6, num_beams=4, num_return_sequences=2))[0]
    assert [x["generated_text"] for x in out[0]] == [c.text for c in want]
    with pytest.raises(LmforgeError, match="beam search is deterministic"):
        gen("x", num_beams=4, do_sample=True)
    # Chat with beams: the reply comes whole, the same as generate_ids.
    params = SamplingParams(temperature=0.0, max_new_tokens=6, num_beams=3)
    session = ChatSession(gen.engine, params, notify=lambda m: None)
    pieces = list(session.send("Hi"))
    assert len(pieces) == 1 and session.history[-1]["content"] == pieces[0].strip()
    with pytest.raises(LmforgeError, match="one reply per turn"):
        ChatSession(gen.engine, dataclasses.replace(params, num_return_sequences=2))
