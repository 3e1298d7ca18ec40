"""A model loaded from a quantized dir computes on its blocks: the torch forward (QuantLinear,
QuantEmbedding), the numpy decoder and the Engine against the same model dequantized to fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import random_model
from test_numpy_decode import CONFIGS as DECODE_CONFIGS
from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine
from lmforge.generate.numpy_decode import PREFILL_TOKENS, NumpyDecoder
from lmforge.model.gpt import Linear
from lmforge.model.io import load_model_dir, model_state_dict, save_model_dir, write_model_files
from lmforge.quant.kernels import INT8
from lmforge.quant.modules import QuantEmbedding, QuantLinear, is_quantized
from lmforge.quant.store import QUANT_KEY, quantize_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

# llama-gqa: vocab 300, not a multiple of the kernels' 8-row groups (padding), GQA, a tied head;
# gpt2: biases, learned positions, an untied head of its own.
CONFIGS = {name: DECODE_CONFIGS[name] for name in ("llama-gqa", "gpt2")}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{(config, format): (quantized dir)} built once: random weights, saved, quantized."""
    root = tmp_path_factory.mktemp("qmodels")
    out = {}
    for name, config in CONFIGS.items():
        model = random_model(config)
        for fmt in ("q8_0", "q4_0", "q4_1"):
            weights, entry = quantize_state_dict(model_state_dict(model), fmt)
            folder = root / f"{name}-{fmt}"
            folder.mkdir()
            write_model_files(model, folder, extra_config={QUANT_KEY: entry}, weights=weights)
            out[(name, fmt)] = folder
    return out


CASES = [(n, f) for n in CONFIGS for f in ("q8_0", "q4_0", "q4_1")]


@pytest.mark.parametrize("name, fmt", CASES)
def test_quantized_modules_replace_every_projection(dirs, name, fmt):
    q, _ = load_model_dir(dirs[(name, fmt)])
    f, _ = load_model_dir(dirs[(name, fmt)], dequantize=True)
    assert is_quantized(q) and not is_quantized(f)
    assert isinstance(q.tok_emb, QuantEmbedding) and isinstance(q.lm_head, QuantLinear)
    assert not any(type(m) is Linear for m in q.modules())
    assert (q.lm_head.packed is q.tok_emb.packed) == CONFIGS[name].tie_embeddings
    assert q.param_count() == f.param_count() and q.param_count(non_embedding=True) == f.param_count(non_embedding=True)


@pytest.mark.parametrize("name, fmt", CASES)
def test_forward_and_decode_match_the_dequantized_model(dirs, name, fmt):
    q, _ = load_model_dir(dirs[(name, fmt)])
    f, _ = load_model_dir(dirs[(name, fmt)], dequantize=True)
    torch.manual_seed(1)
    T = 6
    prompt = torch.randint(0, 300, (3, T))
    with torch.inference_mode():
        # Prefill: 18 rows, the many-row kernel.
        torch.testing.assert_close(q(prompt)[0], f(prompt)[0], atol=1e-4, rtol=1e-4)
        for B in (1, 3):
            qc, dc, fc = q.new_cache(B, 16), q.new_cache(B, 16), f.new_cache(B, 16)
            for m, c in ((q, qc), (q, dc), (f, fc)):
                m(prompt[:B], cache=c)
            decoder = NumpyDecoder(q)
            tok = torch.tensor([[7], [8], [9]])[:B]
            for _ in range(4):
                want, _ = f(tok, cache=fc, logits_to_keep=1)
                got_torch, _ = q(tok, cache=qc, logits_to_keep=1)  # the block kernels, called from torch
                got = decoder.step(tok, dc)
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(got_torch, want, atol=1e-4, rtol=1e-4)
                tok = want[:, -1].argmax(-1, keepdim=True)


@pytest.mark.skipif(INT8 is None, reason="int8 activations need AVX2 or AVX-512 VNNI")
@pytest.mark.parametrize("name, fmt", CASES)
def test_int8_activation_steps_are_close_and_do_not_depend_on_the_batch(dirs, name, fmt):
    """With int8 activations each row's logits are what that row alone gets, bit for bit (so a
    prompt's text does not depend on who else is decoding), within int8 rounding of the exact
    model's."""
    q, _ = load_model_dir(dirs[(name, fmt)])
    f, _ = load_model_dir(dirs[(name, fmt)], dequantize=True)
    torch.manual_seed(2)
    prompt = torch.randint(0, 300, (3, 5))
    tok = torch.tensor([[7], [8], [9]])
    with torch.inference_mode():
        together, exact_cache = q.new_cache(3, 16), f.new_cache(3, 16)
        q(prompt, cache=together)
        f(prompt, cache=exact_cache)
        alone = [q.new_cache(1, 16) for _ in range(3)]
        for r, c in enumerate(alone):
            q(prompt[r : r + 1], cache=c)
        decoder = NumpyDecoder(q, int8_activations=True)
        batch = decoder.step(tok, together)
        for r, c in enumerate(alone):
            assert torch.equal(batch[r], decoder.step(tok[r : r + 1], c)[0])
        exact, _ = f(tok, cache=exact_cache, logits_to_keep=1)
        err = (batch - exact).abs().max() / exact.abs().max()
        assert 0 < err < 0.02, f"int8-activation logits off by {err:.3g} of their range"


def test_int8_activations_are_refused_where_they_do_not_apply(dirs, tiny_model_dir):
    from lmforge.tokenizer import Tokenizer

    f, _ = load_model_dir(dirs[("llama-gqa", "q8_0")], dequantize=True)
    with pytest.raises(LmforgeError, match="not quantized"):
        NumpyDecoder(f, int8_activations=True)
    fp32, _ = load_model_dir(tiny_model_dir)
    with pytest.raises(LmforgeError, match="not quantized"):
        Engine(fp32, Tokenizer.load(tiny_model_dir), int8_activations=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saving_a_loaded_quantized_model_keeps_its_blocks(dirs, tmp_path, name):
    src = dirs[(name, "q4_1")]
    q, _ = load_model_dir(src)
    save_model_dir(q, tmp_path / "again")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert is_quantized(load_model_dir(tmp_path / "again")[0])


@pytest.fixture(scope="module")
def tiny_q4_1(tiny_model_dir, tmp_path_factory):
    from lmforge.interop.convert import quantize_model

    out = tmp_path_factory.mktemp("q") / "llama-q4_1"
    quantize_model(tiny_model_dir, out, "q4_1")
    return out


def test_engine_decodes_a_quantized_model_with_the_numpy_decoder(tiny_q4_1):
    from lmforge.generate.sampling import SamplingParams
    from lmforge.interop.registry import load_model

    q = load_model(tiny_q4_1)
    f = load_model(tiny_q4_1, dequantize=True)
    assert is_quantized(q.model) and not is_quantized(f.model)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    eq = Engine(q.model, q.tokenizer)
    got = eq.generate_ids(prompts, params)
    assert eq.decode_backend_used == "numpy"
    ef = Engine(f.model, f.tokenizer)
    ef.backend = "torch"
    assert got == ef.generate_ids(prompts, params)
    assert [len(g.ids) for g in got] == [6, 6]


def test_generate_and_eval_ppl_take_a_quantized_dir(cli, tiny_q4_1, tmp_path):
    r = cli("generate", str(tiny_q4_1), "def main", "--max-new-tokens", "5", "--temperature", "0")
    assert r.code == 0, r.err
    text = tmp_path / "t.txt"
    text.write_text("def main():\n    return 0\n" * 20)
    q = cli("eval", "ppl", str(tiny_q4_1), "--data", str(text), "--no-progress")
    assert q.code == 0, q.err
    # The same weights in fp32: a model dir written from the dequantized blocks.
    r = cli("convert", str(tiny_q4_1), str(tmp_path / "fp32"), "--to", "lmforge")
    assert r.code == 0, r.err
    f = cli("eval", "ppl", str(tmp_path / "fp32"), "--data", str(text), "--no-progress")
    assert f.code == 0, f.err
    import json

    assert json.loads(q.out)["perplexity"] == pytest.approx(json.loads(f.out)["perplexity"], rel=1e-4)


def test_int8_activations_from_the_command_line(cli, tiny_q4_1, tiny_model_dir):
    args = ["def main", "--max-new-tokens", "5", "--temperature", "0", "--int8-activations"]
    if INT8 is not None:
        r = cli("generate", str(tiny_q4_1), *args)
        assert r.code == 0 and r.out.strip(), r.err
    r = cli("generate", str(tiny_model_dir), *args)  # fp32: nothing to round
    assert r.code != 0 and "not quantized" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_at_their_own_lengths_decode_as_each_sequence_alone(dirs, name):
    """Continuous batching's step: rows holding sequences of different lengths in one cache (each
    from position 0) give, bit for bit, the logits each sequence gets decoded alone."""
    q, _ = load_model_dir(dirs[(name, "q4_1")])
    torch.manual_seed(3)
    prompts = [torch.randint(0, 300, (1, n)) for n in (3, 7, 5)]
    decoder = NumpyDecoder(q)
    with torch.inference_mode():
        alone = [q.new_cache(1, 16) for _ in prompts]
        for p, c in zip(prompts, alone):
            q(p, cache=c)
        shared = q.new_cache(3, 16)
        for r, p in enumerate(prompts):  # each newcomer's prefill into its own row (slot)
            q(p, cache=shared.rows(r, r + 1))
        for r, c in enumerate(alone):
            assert torch.equal(shared.k[:, r, :, : c.pos], c.k[:, 0, :, : c.pos])
        lengths = np.array([p.shape[1] for p in prompts], np.int64)
        tok = torch.tensor([[11], [12], [13]])
        for _ in range(3):
            got = decoder.step(tok, shared, lengths=lengths)
            for r, c in enumerate(alone):
                assert torch.equal(got[r], decoder.step(tok[r : r + 1], c)[0])
            lengths += 1
            tok = got[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("name, fmt", CASES)
def test_numpy_prefill_matches_the_model_and_does_not_depend_on_its_pieces(dirs, name, fmt):
    """The decoder's prefill gives the dequantized model's logits and cache; a prompt prefilled in
    pieces, or decoded token by token, leaves the same bits in the cache as prefilled whole (what
    the serving batcher's prefix reuse rests on)."""
    q, _ = load_model_dir(dirs[(name, fmt)])
    f, _ = load_model_dir(dirs[(name, fmt)], dequantize=True)
    torch.manual_seed(4)
    prompt = torch.randint(0, 300, (1, 13)).tolist()[0]  # 13 rows: 8 + 5 in the many-row kernel
    decoder = NumpyDecoder(q)
    assert decoder.prefills(13) and not decoder.prefills(PREFILL_TOKENS + 1)
    with torch.inference_mode():
        fc, whole = f.new_cache(1, 24), q.new_cache(1, 24)
        want, _ = f(torch.tensor([prompt]), cache=fc, logits_to_keep=1)
        got = decoder.prefill(prompt, whole)
        assert whole.pos == 13
        torch.testing.assert_close(got, want[0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(whole.k[:, :, :, :13], fc.k[:, :, :, :13], atol=1e-4, rtol=1e-4)
        pieces = q.new_cache(1, 24)
        for a, b in ((0, 1), (1, 9), (9, 13)):
            last = decoder.prefill(prompt[a:b], pieces)
        assert torch.equal(last, got)
        stepped = q.new_cache(1, 24)
        decoder.prefill(prompt[:4], stepped)
        for t in prompt[4:]:
            step_logits = decoder.step(torch.tensor([[t]]), stepped)
        assert torch.equal(step_logits[0, -1], got)
        for c in (pieces, stepped):
            assert torch.equal(c.k[:, :, :, :13], whole.k[:, :, :, :13]) and torch.equal(c.v[:, :, :, :13], whole.v[:, :, :, :13])


def test_numpy_prefill_refuses_what_it_does_not_compute(dirs):
    q, _ = load_model_dir(dirs[("llama-gqa", "q4_1")])
    f, _ = load_model_dir(dirs[("llama-gqa", "q4_1")], dequantize=True)
    assert not NumpyDecoder(f).prefills(4)  # fp32 products: torch's BLAS prefills those
    with pytest.raises(LmforgeError, match="fp32 products"):
        NumpyDecoder(f).prefill([1, 2, 3], f.new_cache(1, 8))
    decoder = NumpyDecoder(q)
    with pytest.raises(LmforgeError, match=f"up to {PREFILL_TOKENS} tokens"):
        decoder.prefill(list(range(PREFILL_TOKENS + 1)), q.new_cache(1, PREFILL_TOKENS + 2))
    with pytest.raises(LmforgeError, match="one-row cache"):
        decoder.prefill([1, 2], q.new_cache(2, 8))
    with pytest.raises(LmforgeError, match="KV cache full"):
        decoder.prefill([1, 2, 3], q.new_cache(1, 2))


def test_a_step_on_some_rows_of_a_cache_leaves_the_others_alone(dirs):
    """The batcher's busy slots, wherever they are: rows=[3, 0, 2] of a 4-row cache decode as
    each sequence alone, and row 1 (a free slot holding a finished request's prefix) is untouched."""
    q, _ = load_model_dir(dirs[("llama-gqa", "q4_1")])
    torch.manual_seed(5)
    prompts = [torch.randint(0, 300, (1, n)) for n in (4, 6, 3)]
    decoder = NumpyDecoder(q)
    with torch.inference_mode():
        shared = q.new_cache(4, 16)
        q(torch.randint(0, 300, (1, 5)), cache=shared.rows(1, 2))
        kept = shared.k[:, 1].clone(), shared.v[:, 1].clone()
        rows = np.array([3, 0, 2], np.int64)
        alone = [q.new_cache(1, 16) for _ in prompts]
        for r, p, c in zip(rows, prompts, alone):
            q(p, cache=shared.rows(int(r), int(r) + 1))
            q(p, cache=c)
        lengths = np.array([p.shape[1] for p in prompts], np.int64)
        tok = torch.tensor([[11], [12], [13]])
        for _ in range(3):
            got = decoder.step(tok, shared, lengths=lengths, rows=rows)
            for i, c in enumerate(alone):
                assert torch.equal(got[i], decoder.step(tok[i : i + 1], c)[0])
            lengths += 1
            tok = got[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(shared.k[:, 1], kept[0]) and torch.equal(shared.v[:, 1], kept[1])
        for bad in (np.array([3, 3, 2]), np.array([0, 1, 4]), np.array([0, 1])):
            with pytest.raises(LmforgeError, match="distinct rows"):
                decoder.step(tok, shared, lengths=lengths, rows=bad)
