"""The Engine: KV-cache decoding, batching, sampling, stopping, streaming, bad input."""

from types import SimpleNamespace

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams, apply_repetition_penalty, filter_logits
from lmforge.interop.registry import load_model

GREEDY = dict(temperature=0.0, top_k=0)


@pytest.fixture(params=["tiny_model_dir", "tiny_gpt2_dir"])
def engine(request):
    loaded = load_model(request.getfixturevalue(request.param))
    return Engine(loaded.model, loaded.tokenizer)


def greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


def test_cached_greedy_equals_recomputing_everything(engine):
    ids = engine.encode("def fibonacci(n):\n    return")
    engine.stop_token_ids = []  # compare the raw token streams, no early stop
    got = engine.generate_ids([ids], SamplingParams(max_new_tokens=24, **GREEDY))[0]
    assert got.ids == greedy_without_cache(engine.model, ids, 24) and got.finish_reason == "length"


def test_batched_prompts_of_different_lengths_equal_one_by_one(engine):
    engine.stop_token_ids = []
    prompts = ["import os", "class Foo(object):\n    def __init__(self, x):", "x = 1"]
    p = SamplingParams(max_new_tokens=16, **GREEDY)
    batched = [c.ids for c in engine.generate(prompts, p)]
    alone = [engine.generate([q], p)[0].ids for q in prompts]
    assert batched == alone


def test_seed_makes_sampling_reproducible(engine):
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=0, seed=123)
    a = engine.generate(["for i in"], p)[0].ids
    assert engine.generate(["for i in"], p)[0].ids == a
    b = engine.generate(["for i in"], SamplingParams(max_new_tokens=20, temperature=1.0, top_k=0, seed=124))[0].ids
    assert a != b
    one = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=5)
    assert engine.generate(["x"], one)[0].ids[:3] == engine.generate(["x"], SamplingParams(max_new_tokens=10, **GREEDY))[0].ids[:3]


def test_stop_tokens_and_stop_strings(engine):
    engine.stop_token_ids = []
    p = SamplingParams(max_new_tokens=12, **GREEDY)
    free = engine.generate(["def f(x):"], p)[0]
    third = free.ids[2]
    stopped = engine.generate(["def f(x):"], SamplingParams(max_new_tokens=12, stop_token_ids=[third], **GREEDY))[0]
    assert stopped.ids == free.ids[: free.ids.index(third)] and stopped.finish_reason == "stop"
    snippet = free.text[3:6]
    cut = engine.generate(["def f(x):"], SamplingParams(max_new_tokens=12, stop=[snippet], **GREEDY))[0]
    assert cut.text == free.text[: free.text.find(snippet)] and cut.finish_reason == "stop"


def test_end_of_turn_and_eos_stop_every_generation(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    tok = loaded.tokenizer
    assert set(engine.stop_token_ids) == {tok.eos_id, tok.hf.token_to_id("<|im_end|>")}


def test_streaming_matches_and_never_splits_a_character(engine, monkeypatch):
    p = SamplingParams(max_new_tokens=20, temperature=1.0, seed=9)
    whole = engine.generate(["print("], p)[0].text
    assert "".join(engine.stream("print(", p)) == whole
    # Feed the byte tokens of "é😀" one at a time: nothing may be emitted mid-character.
    tok = engine.tokenizer
    byte_ids = [tok.hf.token_to_id(t) for t in tok.hf.encode("é😀", add_special_tokens=False).tokens]
    assert len(byte_ids) > 2

    def fake_run(prompts, params):
        for i in byte_ids:
            yield torch.tensor([i]), torch.tensor([True])

    monkeypatch.setattr(engine, "_run", fake_run)
    pieces = list(engine.stream_ids([1], SamplingParams(max_new_tokens=10)))
    assert "".join(pieces) == "é😀" and all("\ufffd" not in piece for piece in pieces)


def test_stream_holds_back_a_possible_stop_string(engine, monkeypatch):
    tok = engine.tokenizer
    ids = tok.encode("ab END cd")

    def fake_run(prompts, params):
        for i in ids:
            yield torch.tensor([i]), torch.tensor([True])

    monkeypatch.setattr(engine, "_run", fake_run)
    assert "".join(engine.stream_ids([1], SamplingParams(stop=["END"]))) == "ab "


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**{"temperature": 1.0, "top_k": 0, **kw})))[0].tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.8) == [True, True, False, False]
    assert keep(top_p=0.81) == [True, True, True, False]
    assert keep(min_p=0.5) == [True, True, False, False]
    seen = torch.tensor([[True, False, True, False]])
    out = apply_repetition_penalty(torch.tensor([[2.0, 2.0, -2.0, -2.0]]), seen, 2.0)
    assert out.tolist() == [[1.0, 2.0, -4.0, -2.0]]


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 1.5}, "top_p must be in"), ({"temperature": -1}, "temperature must be >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be positive"), ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.0}, "min_p"),
])
def test_invalid_parameters(kwargs, message):
    with pytest.raises(LmforgeError, match=message):
        SamplingParams(**kwargs)


def test_prompt_errors(engine):
    with pytest.raises(LmforgeError, match="empty prompt"):
        engine.generate([""], SamplingParams())
    long = "word " * 400
    with pytest.raises(LmforgeError, match=r"exceeds the model's context of 128 tokens; shorten it or use --truncate left"):
        engine.generate([long], SamplingParams(max_new_tokens=8))
    out = engine.generate([long], SamplingParams(max_new_tokens=8, **GREEDY), truncate="left")[0]
    assert len(out.prompt_ids) == 120


@pytest.mark.parametrize("rows", [1, 8, 70])
def test_numpy_blas_backend_gives_the_same_logits(tiny_model_dir, rows):
    from lmforge.runtime import inference_backend

    model = load_model(tiny_model_dir).model
    ids = torch.randint(0, 300, (1, rows))
    threads = torch.get_num_threads()
    with torch.no_grad():
        ref, _ = model(ids)
        with inference_backend(model, "numpy"):
            assert torch.get_num_threads() == 1
            got, _ = model(ids)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("numpy_s, torch_s, want", [(1.0, 2.0, "numpy"), (1.0, 1.05, "torch"), (2.0, 1.0, "torch")])
def test_the_backend_choice_follows_the_measurement(tiny_model_dir, monkeypatch, numpy_s, torch_s, want):
    """A fake clock charges each decode step what the case says: the choice must go to numpy
    only where it measured at least 10% faster, and the Engine must decode with that choice."""
    from lmforge.generate import backend
    from lmforge.generate.numpy_decode import NumpyDecoder

    loaded = load_model(tiny_model_dir)
    model = loaded.model
    clock = [0.0]
    monkeypatch.setattr(backend, "_CHOICE", {})
    monkeypatch.setattr(backend, "time", SimpleNamespace(perf_counter=lambda: clock[0]))  # this module's clock only
    real_forward = model.forward

    def timed_forward(*args, **kwargs):
        clock[0] += torch_s
        return real_forward(*args, **kwargs)

    def timed_step(self, token, cache):
        clock[0] += numpy_s

    monkeypatch.setattr(model, "forward", timed_forward)
    monkeypatch.setattr(NumpyDecoder, "step", timed_step)
    assert backend.choose_inference_backend(model) == want
    assert Engine(model, loaded.tokenizer).backend == want  # measured once, per architecture


def test_presence_and_frequency_penalties_follow_openais_formula():
    """logit - count * frequency_penalty - (count > 0) * presence_penalty, counts over generated tokens."""
    import torch

    from lmforge.generate.sampling import apply_presence_frequency

    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    got = apply_presence_frequency(logits, counts, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert torch.equal(got, torch.tensor([[1.0, 0.25, -0.25, 1.0]]))
    with pytest.raises(LmforgeError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
