"""Continuous batching (lmforge.generate.batcher): requests that join and leave a running batch get
exactly what `Engine.generate_ids` gives each one alone."""

from __future__ import annotations

import os

import pytest

from lmforge.generate.batcher import ContinuousBatcher
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.quant.kernels import INT8


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory):
    from lmforge.interop.convert import quantize_model
    from lmforge.interop.registry import load_model

    out = tmp_path_factory.mktemp("q") / "tiny-q4_1"
    quantize_model(tiny_model_dir, out, "q4_1")
    return load_model(out)


def run(batcher: ContinuousBatcher, schedule: dict[int, list]) -> dict[int, tuple[str, list[int], str]]:
    """Submit schedule[k] (prompt ids, params) before step k; step until all finish."""
    texts, ids, reasons, names = {}, {}, {}, {}
    step = 0
    while batcher.busy or any(k >= step for k in schedule):
        for prompt, params in schedule.get(step, []):
            rid = batcher.submit(prompt, params)
            names[rid] = (tuple(prompt), params.seed, params.temperature)
            texts[rid], ids[rid] = "", []
        for e in batcher.step():
            texts[e.request_id] += e.text
            if e.token_id is not None:
                ids[e.request_id].append(e.token_id)
            if e.finish_reason:
                reasons[e.request_id] = e.finish_reason
        step += 1
    return {rid: (texts[rid], ids[rid], reasons[rid]) for rid in texts}


def test_requests_joining_a_running_batch_get_their_text_alone(quantized):
    engine = Engine(quantized.model, quantized.tokenizer)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, seed=7, ignore_eos=True)
    prompts = [engine.encode(t) for t in ("def main():", "import os\nimport", "class A:", "x = [", "for i in")]
    schedule = {0: [(prompts[0], greedy), (prompts[1], sampled)], 3: [(prompts[2], greedy)],
                4: [(prompts[3], sampled), (prompts[4], greedy)]}
    batcher = ContinuousBatcher(engine, max_batch=3)  # fewer slots than requests: one waits
    got = run(batcher, schedule)
    submitted = [item for k in sorted(schedule) for item in schedule[k]]
    assert len(got) == len(submitted)
    for rid, (prompt, params) in enumerate(submitted):
        want = Engine(quantized.model, quantized.tokenizer).generate_ids([prompt], params)[0]
        text, ids, reason = got[rid]
        assert ids == want.ids and text == want.text and reason == want.finish_reason, rid
    assert not batcher.active and sorted(batcher.free) == [0, 1, 2]


def test_stop_strings_and_cancel_free_their_slot(quantized):
    engine = Engine(quantized.model, quantized.tokenizer)
    prompt = engine.encode("def main():")
    alone = engine.generate_ids([prompt], SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True))[0]
    stop = alone.text[3:5]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop])
    want = engine.generate_ids([prompt], params)[0]
    batcher = ContinuousBatcher(engine, max_batch=2)
    a = batcher.submit(prompt, params)
    b = batcher.submit(prompt, SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True))
    text, reasons = {a: "", b: ""}, {}
    for k in range(40):
        if k == 2:
            batcher.cancel(b)
        for e in batcher.step():
            text[e.request_id] += e.text
            if e.finish_reason:
                reasons[e.request_id] = e.finish_reason
        if not batcher.busy:
            break
    assert text[a] == want.text and reasons[a] == "stop" and stop not in text[a]
    assert reasons[b] == "cancelled" and not batcher.busy and sorted(batcher.free) == [0, 1]


def test_models_the_numpy_decoder_does_not_run_decode_row_by_row_in_torch(tiny_model_dir):
    from lmforge.interop.registry import load_model

    loaded = load_model(tiny_model_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    engine.backend = "torch"  # as for LoRA layers or a GPU
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [engine.encode(t) for t in ("def f(x):", "while True:")]
    got = run(ContinuousBatcher(engine, max_batch=2), {0: [(prompts[0], params)], 2: [(prompts[1], params)]})
    for rid, prompt in enumerate(prompts):
        alone = Engine(loaded.model, loaded.tokenizer)
        alone.backend = "torch"
        assert got[rid][1] == alone.generate_ids([prompt], params)[0].ids


def test_a_free_slot_between_busy_ones_changes_nothing(quantized):
    """Slots 0 and 2 decoding with slot 1 freed between them (the decoder steps the span of rows,
    the free one on a dummy token): both texts as alone."""
    engine = Engine(quantized.model, quantized.tokenizer)
    long = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    prompts = [engine.encode(t) for t in ("def main():", "x = 1", "import sys")]
    batcher = ContinuousBatcher(engine, max_batch=3)
    gaps = []
    real_decode = batcher._decode
    batcher._decode = lambda slots: (gaps.append(slots), real_decode(slots))[1]
    got = run(batcher, {0: [(prompts[0], long), (prompts[1], short), (prompts[2], long)]})
    assert [0, 2] in gaps
    for rid, (prompt, params) in enumerate(((prompts[0], long), (prompts[1], short), (prompts[2], long))):
        assert got[rid][1] == Engine(quantized.model, quantized.tokenizer).generate_ids([prompt], params)[0].ids


def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes(quantized):
    """prefill_chunk=8: a 40-token prompt goes in five pieces, one a step, and the running request
    gets a token at each of those steps; the long prompt's greedy text is still its text alone
    (the chunks compute the same attention, in other shapes). A prompt of at most one chunk is
    never split, even when a step's budget is partly spent."""
    engine = Engine(quantized.model, quantized.tokenizer)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    running = engine.encode("def main():")
    long = engine.encode("import os\nimport sys\nfrom typing import Any\n\n\ndef parse(text: str) -> dict:\n    ")
    long = (long * 8)[:40]
    short = running[:5]
    batcher = ContinuousBatcher(engine, max_batch=3, prefill_chunk=8)
    pieces = []
    real_prefill = batcher._prefill
    batcher._prefill = lambda seq, n: (pieces.append((seq.request_id, n)), real_prefill(seq, n))[1]
    a = batcher.submit(running, SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True))
    batcher.step()  # a's prompt (8 tokens or fewer: one piece) and its first token
    b = batcher.submit(long, params)
    c = batcher.submit(short, params)
    tokens_of_a = []
    while batcher.busy:
        events = batcher.step()
        tokens_of_a.append(sum(e.request_id == a and e.sampled for e in events))
    assert [n for rid, n in pieces if rid == b] == [8, 8, 8, 8, 8]
    assert [n for rid, n in pieces if rid == c] == [5]  # whole, in a step of its own
    assert all(tokens_of_a[:6])  # a decoded at every step while b was prefilled
    got = run(ContinuousBatcher(engine, max_batch=2, prefill_chunk=8), {0: [(long, params), (short, params)]})
    for rid, prompt in enumerate((long, short)):
        assert got[rid][1] == engine.generate_ids([prompt], params)[0].ids


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_a_server_sized_cache_takes_memory_only_for_the_tokens_it_holds():
    """32 slots x 2048 tokens of SmolLM2-135M's shape is 2.9 GB of cache: resident only where written."""
    from lmforge.model.config import get_preset
    from lmforge.model.gpt import KVCache

    config = get_preset("smollm2-135m")
    before = _rss_bytes()
    cache = KVCache(config, 32, 2048)
    cache_bytes = cache.k.numel() * cache.k.element_size() * 2
    assert cache_bytes > 2 << 30
    assert _rss_bytes() - before < 64 << 20
    cache.k[:, :, :, :100] = 1.0  # 100 tokens in every slot
    cache.v[:, :, :, :100] = 1.0
    assert float(cache.k[0, 31, 0, 99, 0]) == 1.0 and float(cache.k[0, 31, 0, 100, 0]) == 0.0
    assert _rss_bytes() - before < cache_bytes / 8


def _finish(batcher: ContinuousBatcher, prompt: list[int], params: SamplingParams) -> tuple[list[int], int]:
    """The request's token ids, and the prompt tokens it found cached (its events' count)."""
    rid = batcher.submit(prompt, params)
    ids, cached = [], 0
    while batcher.busy:
        for e in batcher.step():
            if e.request_id == rid:
                ids += [e.token_id] if e.token_id is not None else []
                cached += e.cached
    return ids, cached


@pytest.mark.parametrize("reuse", [True, False])
def test_a_prompt_continues_the_prefix_a_finished_request_left_in_its_slot(quantized, reuse):
    """A request that repeats a finished one's prompt (a shared system prompt) or continues its
    conversation (prompt + reply + a new turn) prefills only the rest, in the slot holding the
    longest shared prefix, and still gets exactly the text it gets alone."""
    engine = Engine(quantized.model, quantized.tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    system = engine.encode("# A helpful assistant.\n")
    first, other = system + engine.encode("def main():"), engine.encode("while True:")
    batcher = ContinuousBatcher(engine, max_batch=2, reuse_prefix=reuse)
    prefilled = []
    real_prefill = batcher._prefill
    batcher._prefill = lambda seq, n: (prefilled.append(n), real_prefill(seq, n))[1]
    reply, _ = _finish(batcher, first, params)
    # Nothing shared: the empty slot, so that the first request's cache stays for later.
    assert _finish(batcher, other, params)[0] == engine.generate_ids([other], params)[0].ids
    if reuse:
        assert batcher.held[0][: len(first)] == first and batcher.held[1][: len(other)] == other
    # A request continuing `other` takes slot 1 though slot 0 is free too.
    rid = batcher.submit(other + engine.encode(" pass"), params)
    batcher.step()
    assert [seq.slot for seq in batcher.active.values()] == [1 if reuse else 0]
    batcher.cancel(rid)
    while batcher.busy:
        batcher.step()
    # The conversation goes on: the whole first request is in the cache but its last token
    # (never fed back to the model).
    turn = first + reply + engine.encode("\n# again:\n")
    prefilled.clear()
    got, cached = _finish(batcher, turn, params)
    assert got == engine.generate_ids([turn], params)[0].ids
    shared = len(first) + len(reply) - 1
    assert prefilled == ([len(turn) - shared] if reuse else [len(turn)])
    assert cached == (shared if reuse else 0)
    # The same prompt again: all of it shared but the last token, which gives the first logits.
    prefilled.clear()
    assert _finish(batcher, turn, params)[0] == got and prefilled == ([1] if reuse else [len(turn)])


@pytest.mark.skipif(INT8 is None, reason="int8 activations need AVX2 or AVX-512 VNNI")
def test_with_int8_activations_only_prefilled_tokens_are_reused(quantized):
    """int8 decode steps write other bits than the prefill: a reply is never reused, a prompt is."""
    engine = Engine(quantized.model, quantized.tokenizer, int8_activations=True)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = engine.encode("def main():")
    batcher = ContinuousBatcher(engine, max_batch=1)
    reply, _ = _finish(batcher, prompt, params)
    assert batcher.held[0] == prompt
    turn = prompt + reply + engine.encode(" x")
    ids, cached = _finish(batcher, turn, params)
    assert ids == engine.generate_ids([turn], params)[0].ids and cached == len(prompt)
