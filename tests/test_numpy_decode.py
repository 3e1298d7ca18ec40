"""The numpy decode step against the torch forward it replaces: same logits, same cache."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from lmforge.errors import LmforgeError
from lmforge.generate import numpy_decode
from lmforge.generate.numpy_decode import NumpyDecoder
from lmforge.model.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "llama-gqa": ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                             intermediate_size=96),
    "gpt2": ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=64,
                        intermediate_size=128, norm="layernorm", mlp="gelu", position="learned", bias=True,
                        tie_embeddings=False),
    "gelu-exact-rope-bias": ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                        intermediate_size=64, norm="layernorm", mlp="gelu_exact", bias=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("B", [3, 11])  # 11: more rows than one kernel block of 8
def test_decode_steps_match_the_torch_forward(name, padded, B):
    model = random_model(CONFIGS[name])
    T = 6
    prompt = torch.randint(0, 300, (B, T))
    lengths = [(6, 4, 2)[row % 3] for row in range(B)] if padded else [T] * B
    key_mask = torch.zeros(B, 20, dtype=torch.bool)
    for row, n in enumerate(lengths):
        key_mask[row, T - n : T] = True
    positions = (key_mask[:, :T].long().cumsum(-1) - 1).clamp(min=0)
    next_pos = torch.tensor(lengths)
    with torch.inference_mode():
        ours, ref = model.new_cache(B, 20), model.new_cache(B, 20)
        mask = key_mask[:, :T] if padded else None
        for cache in (ours, ref):
            model(prompt, positions=positions if padded else None, attn_mask=mask, cache=cache)
        decoder = NumpyDecoder(model)
        tok = torch.arange(7, 7 + B)
        for _ in range(4):
            kwargs = {}
            if padded:
                key_mask[:, ref.pos] = True
                kwargs = {"positions": next_pos[:, None], "attn_mask": key_mask[:, : ref.pos + 1]}
            got = decoder.step(tok[:, None], ours, **kwargs)
            want, _ = model(tok[:, None], cache=ref, logits_to_keep=1, **kwargs)
            if padded:
                next_pos += 1
            assert ours.pos == ref.pos
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(ours.k, ref.k, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(ours.v, ref.v, atol=2e-5, rtol=1e-5)
            tok = want[:, -1].argmax(-1)


def test_engine_numpy_and_torch_backends_generate_the_same_tokens(tiny_model_dir):
    from lmforge.generate.engine import Engine
    from lmforge.generate.params import SamplingParams
    from lmforge.interop.registry import load_model

    loaded = load_model(tiny_model_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    out = {}
    for backend in ("torch", "numpy"):
        engine.backend = backend
        out[backend] = [c.ids for c in engine.generate_ids(prompts, params)]
    assert out["numpy"] == out["torch"]
    assert any(out["torch"])


def test_decode_steps_hold_torch_to_one_thread_and_give_the_kernels_the_rest(tiny_model_dir, monkeypatch):
    """During a decode step torch is held to one thread (numpy's BLAS path needs that), the
    kernels run on the threads torch had before, not on that one, and the Linear layers stay on
    torch's path (the decoder never calls them); afterwards torch has its threads back."""
    import numba

    from lmforge.generate.engine import Engine
    from lmforge.generate.params import SamplingParams
    from lmforge.interop.registry import load_model
    from lmforge.model.gpt import Linear

    loaded = load_model(tiny_model_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    engine.backend = "numpy"
    seen = []
    real_step = NumpyDecoder.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        flags = {m.numpy_blas for m in loaded.model.modules() if isinstance(m, Linear)}
        seen.append((torch.get_num_threads(), kernel_seen[-1], flags))
        return out

    kernel_seen = []
    real_linear = numpy_decode.few_row_linear

    def few_row_linear(x, w):  # inside the step: the kernels' thread count
        kernel_seen.append(numba.get_num_threads())
        return real_linear(x, w)

    monkeypatch.setattr(NumpyDecoder, "step", step)
    monkeypatch.setattr(numpy_decode, "few_row_linear", few_row_linear)
    threads = 2
    torch.set_num_threads(threads)  # the fixture's one thread would make the check trivial
    numba.set_num_threads(1)  # a count left over from elsewhere: the decoder must set its own
    engine.generate_ids([[5, 6, 7]], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert torch.get_num_threads() == threads
    assert numba.get_num_threads() == 1  # the caller's count, restored after every step
    kernel_threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    assert seen and all(s == (1, kernel_threads, {False}) for s in seen), seen


def test_an_engine_that_only_scores_never_loads_the_decode_kernels(tiny_model_dir):
    """The decode backend is measured on first decode: scoring (perplexity, tasks) must not pay
    for numba's import and the kernels' compile or load."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lmforge.generate import backend\n"
        "backend._measure = lambda model, decoder: 'numpy'  # the decoder's path, whatever this machine measures\n"
        "from lmforge.generate.engine import Engine\n"
        "from lmforge.interop.registry import load_model\n"
        f"loaded = load_model({str(tiny_model_dir)!r})\n"
        "engine = Engine(loaded.model, loaded.tokenizer)\n"
        "engine.score([[5, 6, 7, 8, 9]])\n"
        "assert 'numba' not in sys.modules, 'scoring imported numba'\n"
        "engine.generate_ids([[5, 6]], __import__('lmforge.generate.params', fromlist=['x']).SamplingParams("
        "max_new_tokens=2, temperature=0.0))\n"
        "print(engine.backend, 'numba' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["numpy", "True"]  # decoding, unlike scoring, loaded the kernels


def test_the_first_compile_of_the_kernels_is_announced(monkeypatch, capsys):
    from lmforge.generate import backend
    from lmforge.generate import kernels

    model = random_model(CONFIGS["llama-gqa"])
    backend._measure(model, NumpyDecoder(model))  # compiles (and caches) the kernels if nothing did yet
    capsys.readouterr()
    assert kernels.compiled_before()
    backend._measure(model, NumpyDecoder(model))
    assert "compiling the decode kernels" not in capsys.readouterr().err
    monkeypatch.setattr(kernels, "compiled_before", lambda: False)
    backend._measure(model, NumpyDecoder(model))
    assert "lmforge: compiling the decode kernels (once per machine" in capsys.readouterr().err


def test_the_backend_choice_is_measured_apart_for_models_the_decoder_cannot_run(monkeypatch):
    """A LoRA-wrapped model of the same shape decodes through torch's layers, not the decoder:
    the choice measured with the decoder must not be reused for it."""
    from lmforge.generate import backend
    from lmforge.model.lora import apply_lora
    from lmforge.model.lora_config import LoRAConfig

    measured = []
    monkeypatch.setattr(backend, "_CHOICE", {})
    monkeypatch.setattr(backend, "_measure", lambda model, decoder: measured.append(decoder is not None) or "torch")
    plain, wrapped = random_model(CONFIGS["llama-gqa"]), random_model(CONFIGS["llama-gqa"])
    apply_lora(wrapped, LoRAConfig())
    wrapped.eval()
    for model in (plain, plain, wrapped, wrapped):
        assert backend.choose_inference_backend(model) == "torch"
    assert measured == [True, False]


def test_only_plain_inference_models_are_supported():
    from lmforge.model.lora import apply_lora
    from lmforge.model.lora_config import LoRAConfig

    model = random_model(CONFIGS["llama-gqa"])
    assert numpy_decode.supports(model)
    model.train()
    assert not numpy_decode.supports(model)
    model.eval()
    apply_lora(model, LoRAConfig())
    assert not numpy_decode.supports(model)
    with pytest.raises(LmforgeError, match="not a plain CPU fp32"):
        NumpyDecoder(model)


def test_a_full_cache_is_refused():
    model = random_model(CONFIGS["llama-gqa"])
    with torch.inference_mode():
        cache = model.new_cache(1, 4)
        model(torch.tensor([[1, 2, 3, 4]]), cache=cache)
        with pytest.raises(LmforgeError, match="KV cache full: 4 cached"):
            NumpyDecoder(model).step(torch.tensor([[5]]), cache)
        with pytest.raises(LmforgeError, match=r"one token per row: idx of shape \(1, 2\)"):
            NumpyDecoder(model).step(torch.tensor([[5, 6]]), cache)


def test_the_kernels_thread_count_changes_the_speed_only_never_the_logits(tiny_model_dir, tmp_path):
    """The governor may switch counts between steps, so a step must give the same bits on any."""
    import numba

    from lmforge.interop.convert import quantize_model
    from lmforge.interop.registry import load_model

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 threads")
    quantize_model(tiny_model_dir, tmp_path / "q", "q4_1")
    for m in (random_model(CONFIGS["llama-gqa"]), load_model(tmp_path / "q").model):
        outs = []
        for threads in (1, 2):
            decoder = NumpyDecoder(m, threads=threads)
            cache = m.new_cache(3, 20)
            with torch.inference_mode():
                m(torch.randint(0, 200, (3, 5), generator=torch.Generator().manual_seed(0)), cache=cache)
                outs.append(decoder.step(torch.tensor([[7], [8], [9]]), cache))
        assert torch.equal(outs[0], outs[1])


def _governed(times_for, steps: int, full: int = 2, rows: int = 1) -> list[int]:
    from lmforge.generate.threads import ThreadGovernor

    gov, used = ThreadGovernor(full), []
    for _ in range(steps):
        n = gov.threads()
        used.append(n)
        gov.record(rows, times_for(n, len(used)))
    return used


def test_the_governor_keeps_every_thread_on_a_quiet_machine():
    jitter = [0.0115, 0.0118, 0.0121, 0.0116, 0.0125]  # quiet steps: 2 threads beat 1 (0.019)
    used = _governed(lambda n, i: jitter[i % 5] if n == 2 else 0.019, 500)
    assert set(used) == {2}


def test_the_governor_moves_to_one_thread_when_a_neighbour_takes_a_core_and_back_when_it_leaves():
    def times(n, i):
        busy = 100 <= i < 400  # another process wants a core for these steps
        if n == 2:
            return 0.07 if busy else 0.0115
        return 0.023 if busy else 0.019

    used = _governed(times, 600)
    assert set(used[:100]) == {2}
    assert used[110:400].count(1) > 0.9 * 290  # one thread within a few steps, trials of two now and then
    assert used[480:].count(2) == len(used[480:])  # back on every thread after the neighbour left


def test_the_governor_leaves_single_thread_decoders_alone():
    assert set(_governed(lambda n, i: 1.0, 50, full=1)) == {1}


def test_the_governor_survives_batch_sizes_changing_under_a_trial():
    from lmforge.generate.threads import ThreadGovernor

    gov = ThreadGovernor(2)
    for i in range(400):  # slow steps, rows changing every few steps as requests come and go
        n = gov.threads()
        gov.record(1 + (i // 6) % 4, 0.07 if n == 2 and i % 5 else 0.01)
    assert gov.threads() in (1, 2)
