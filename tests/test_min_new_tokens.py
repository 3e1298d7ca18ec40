"""min_new_tokens and ignore_eos (the transformers / vLLM names): a model whose greedy choice is
always eos ends at once; with min_new_tokens it cannot before N tokens, with ignore_eos it runs to
max_new_tokens, on every path (batched rows, streaming, the numba decoder, pipeline, CLI)."""

import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine
from lmforge.generate.params import SamplingParams
from lmforge.generate.pipeline import TextGenerationPipeline
from lmforge.interop.bundle import GENERATION_FILE
from lmforge.interop.registry import load_model
from lmforge.manifest import write_manifest
from lmforge.model.io import save_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(temperature=0.0, top_k=0)
PROMPTS = ["import os", "class Foo(object):\n    def __init__(self, x):", "x"]


def eos_first(loaded):
    """Make eos the argmax at every step: the final LayerNorm's output is its bias alone (weight
    0), and eos's head row points along it, far above every other token."""
    model, eos = loaded.model, loaded.tokenizer.eos_id
    with torch.no_grad():
        model.norm_f.weight.zero_()
        bias = model.norm_f.bias
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)))
        model.lm_head.weight[eos] = bias * (50.0 / float(bias.norm() ** 2))
    return loaded


@pytest.fixture(scope="module")
def eos_model_dir(tiny_gpt2_dir, tmp_path_factory):
    """Its generation.json names eos as a stop token, as imported models' do: a model's own end
    token, which ignore_eos passes, not one the request asked for."""
    loaded = eos_first(load_model(tiny_gpt2_dir))
    path = save_model_dir(loaded.model, tmp_path_factory.mktemp("eos") / "model", tokenizer=loaded.tokenizer)
    (path / GENERATION_FILE).write_text(json.dumps({"stop_token_ids": [loaded.tokenizer.eos_id]}))
    write_manifest(path)
    return path


@pytest.fixture
def engine(eos_model_dir):
    loaded = load_model(eos_model_dir)
    return Engine(loaded.model, loaded.tokenizer, stop_token_ids=loaded.generation["stop_token_ids"])


def test_without_the_options_greedy_stops_at_once(engine):
    got = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, **GREEDY))
    assert [(c.ids, c.finish_reason) for c in got] == [([], "stop")] * len(PROMPTS)


@pytest.mark.parametrize("sampling", [GREEDY, dict(temperature=1.0, top_k=0, seed=3)])
def test_min_new_tokens_holds_back_every_stop_token_in_every_row(engine, sampling):
    eot = engine.tokenizer.hf.token_to_id("<|im_end|>")
    p = SamplingParams(max_new_tokens=12, min_new_tokens=5, **sampling)
    stops = set(engine.stop_token_ids) | {eot}
    for c in engine.generate(PROMPTS, p):  # left-padded rows of different lengths
        assert len(c.ids) >= 5 and not stops & set(c.ids[:5])
        if sampling is GREEDY:  # eos is the argmax again as soon as it is allowed
            assert len(c.ids) == 5 and c.finish_reason == "stop"


def test_min_new_tokens_holds_back_the_requests_stop_token_ids_too(engine):
    engine.stop_token_ids = []  # greedy's own choice now runs on: make it a requested stop token
    first = engine.generate(["x"], SamplingParams(max_new_tokens=4, **GREEDY))[0].ids[0]
    got = engine.generate(["x"], SamplingParams(max_new_tokens=8, min_new_tokens=3, stop_token_ids=[first], **GREEDY))[0]
    assert len(got.ids) == 3 and first not in got.ids and got.finish_reason == "stop"


def test_ignore_eos_runs_to_max_new_tokens_and_keeps_eos(engine):
    eos = engine.tokenizer.eos_id
    for c in engine.generate(PROMPTS, SamplingParams(max_new_tokens=7, ignore_eos=True, **GREEDY)):
        assert c.ids == [eos] * 7 and c.finish_reason == "length"
        assert c.text == engine.tokenizer.decode([eos] * 7) and c.text  # kept as text
    # The request's own stop tokens and stop strings still end it, as in vLLM.
    p = SamplingParams(max_new_tokens=7, ignore_eos=True, stop_token_ids=[eos], **GREEDY)
    assert engine.generate(["x"], p)[0].ids == []  # asked for by the request: still a stop (vLLM)
    eos_text = engine.tokenizer.decode([eos])
    got = engine.generate(["x"], SamplingParams(max_new_tokens=7, ignore_eos=True, stop=[eos_text], **GREEDY))[0]
    assert got.text == "" and got.finish_reason == "stop"


def test_stop_strings_count_only_from_min_new_tokens(engine):
    free = engine.generate(["x"], SamplingParams(max_new_tokens=6, min_new_tokens=6, **GREEDY))[0]
    token = engine.tokenizer.decode(free.ids[:1])
    assert free.ids == free.ids[:1] * 6  # the same runner-up every step: its text repeats
    got = engine.generate(["x"], SamplingParams(max_new_tokens=6, min_new_tokens=3, stop=[token], **GREEDY))[0]
    # Not honoured in tokens 1-2; the one ending in token 3 ends it, cut where it begins.
    assert len(got.ids) == 3 and got.text == token * 2 and got.finish_reason == "stop"
    streamed = "".join(engine.stream_ids(engine.encode("x"), SamplingParams(max_new_tokens=6, min_new_tokens=3, stop=[token], **GREEDY)))
    assert streamed == token * 2


def test_streaming_honours_both(engine):
    ids = engine.encode("x")
    assert "".join(engine.stream_ids(ids, SamplingParams(max_new_tokens=5, **GREEDY))) == ""
    want = engine.generate_ids([ids], SamplingParams(max_new_tokens=5, min_new_tokens=4, **GREEDY))[0].text
    assert want and "".join(engine.stream_ids(ids, SamplingParams(max_new_tokens=5, min_new_tokens=4, **GREEDY))) == want
    eos = engine.tokenizer.decode([engine.tokenizer.eos_id])
    assert "".join(engine.stream_ids(ids, SamplingParams(max_new_tokens=5, ignore_eos=True, **GREEDY))) == eos * 5


def test_the_numba_decoder_path_honours_both(engine, monkeypatch):
    from lmforge.generate.numpy_decode import NumpyDecoder

    steps, real_step = [], NumpyDecoder.step
    monkeypatch.setattr(NumpyDecoder, "step", lambda self, *a, **kw: steps.append(1) or real_step(self, *a, **kw))
    engine.backend = "numpy"
    got = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, min_new_tokens=4, **GREEDY))
    assert [len(c.ids) for c in got] == [4] * len(PROMPTS)
    assert not set(engine.stop_token_ids) & {t for c in got for t in c.ids}
    got = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, ignore_eos=True, **GREEDY))
    assert [len(c.ids) for c in got] == [6] * len(PROMPTS)
    assert len(steps) == 4 + 5  # every decode step after the prefill ran in the decoder


def test_pipeline_takes_the_transformers_keywords(eos_model_dir):
    gen = TextGenerationPipeline(load_model(eos_model_dir))
    assert gen("x", max_new_tokens=6, return_full_text=False) == [{"generated_text": ""}]
    out = gen(["x", "import os"], max_new_tokens=6, min_new_tokens=6, return_full_text=False)
    assert all(o[0]["generated_text"] for o in out)
    ids = gen.engine.encode(out[0][0]["generated_text"])
    assert len(ids) >= 1 and gen.tokenizer.eos_id not in ids
    eos = gen.tokenizer.decode([gen.tokenizer.eos_id])
    assert gen("x", max_new_tokens=3, ignore_eos=True, return_full_text=False) == [{"generated_text": eos * 3}]


def test_cli_flags(cli, engine, eos_model_dir):
    assert cli("generate", eos_model_dir, "x", "--temperature", "0", "--max-new-tokens", "6").out == "\n"
    eos = engine.tokenizer.decode([engine.tokenizer.eos_id])
    r = cli("generate", eos_model_dir, "x", "--temperature", "0", "--max-new-tokens", "4", "--ignore-eos")
    assert r.code == 0 and r.out == eos * 4 + "\n"
    five = engine.generate(["x"], SamplingParams(max_new_tokens=8, min_new_tokens=5, **GREEDY))[0]
    assert len(five.ids) == 5 and five.text
    r = cli("generate", eos_model_dir, "x", "--temperature", "0", "--max-new-tokens", "8", "--min-new-tokens", "5")
    assert r.code == 0 and r.out == five.text + "\n"


@pytest.mark.parametrize("kwargs, message", [
    ({"min_new_tokens": -1}, "min_new_tokens must be an integer in \\[0, max_new_tokens=128\\], got -1"),
    ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens .* got 9"),
    ({"min_new_tokens": 2.5}, "min_new_tokens"),
    ({"ignore_eos": "yes"}, "ignore_eos must be true or false, got 'yes'"),
])
def test_bad_values_are_one_line_errors(kwargs, message):
    with pytest.raises(LmforgeError, match=message) as err:
        SamplingParams(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_values_on_the_command_line_and_in_the_pipeline(cli, eos_model_dir):
    r = cli("generate", eos_model_dir, "x", "--max-new-tokens", "4", "--min-new-tokens", "5")
    assert r.code != 0 and r.err.strip().count("\n") == 0 and "min_new_tokens" in r.err and "Traceback" not in r.err
    gen = TextGenerationPipeline(load_model(eos_model_dir))
    with pytest.raises(LmforgeError, match="ignore_eos"):
        gen("x", ignore_eos=1)
