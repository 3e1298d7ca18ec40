"""`lmforge estimate` (training and inference, here or on a named GPU, `--measure`) and
`lmforge choose`: the KV cache and weight sizes against what lmforge allocates and writes, the
predicted training peak against a measured one (within 25%), the ranking and every kind of
rejection, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_line_error
from lmforge.choose import TASK_CONTEXT, choose, parse_size
from lmforge.errors import LmforgeError
from lmforge.model import speed
from lmforge.model.config import PRESETS, ModelConfig, get_preset
from lmforge.model.hardware import GPUS, Hardware, gpu
from lmforge.model.speed import WEIGHT_BYTES, inference_estimate, kv_cache_bytes, training_estimate, training_speed

REPO = Path(__file__).resolve().parents[1]
BIG_GPU = Hardware("test gpu", "gpu", 200 * 10**9, 1e15, 3e12, "test", precision="bf16")


def test_kv_cache_bytes_equal_the_cache_lmforge_allocates():
    from lmforge.model.gpt import KVCache

    config = ModelConfig(vocab_size=64, block_size=64, n_layer=3, n_head=6, n_kv_head=2, n_embd=48,
                         intermediate_size=96, position="rope", norm="rmsnorm", mlp="swiglu")
    cache = KVCache(config, 3, 40)
    allocated = (cache.k.numel() + cache.v.numel()) * cache.k.element_size()
    assert kv_cache_bytes(config, 3, 40) == allocated
    est = inference_estimate(config, BIG_GPU, batch_size=3, context=40)
    assert est.kv_cache_bytes == kv_cache_bytes(config, 3, 40, 2)  # bf16 on a GPU


def test_weight_bytes_per_format_are_the_block_formats():
    from lmforge.quant.formats import block_format

    for name in ("q8_0", "q4_0", "q4_1"):
        assert WEIGHT_BYTES[name] == block_format(name).block_bytes / 32


def test_quantized_weight_bytes_match_a_quantized_model_dir(tiny_model_dir, tmp_path, cli):
    from lmforge.model.io import load_model_dir

    out = tmp_path / "q4"
    r = cli("quantize", tiny_model_dir, "--to", "q4_1", "-o", out)
    assert r.code == 0, r.err
    config = load_model_dir(tiny_model_dir)[0].config
    params = training_estimate(config, 1, 1, BIG_GPU)["params"]
    predicted = speed.weight_bytes(config, params, "q4_1")
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert abs(predicted / written - 1) < 0.15, (predicted, written)  # headers and fp32 norms aside


def test_training_speed_is_the_sum_of_its_terms():
    c = get_preset("gpt2-124m")
    a = training_speed(c, 4, 512, BIG_GPU)
    b = training_speed(c, 8, 512, BIG_GPU)
    assert a.step_seconds == pytest.approx(a.matmul_seconds + a.memory_seconds)
    assert b.flops_per_step == pytest.approx(2 * a.flops_per_step)
    assert a.matmul_efficiency == speed.GPU_MATMUL_EFFICIENCY
    ckpt = training_speed(c, 4, 512, BIG_GPU, activation_checkpointing=True)
    assert ckpt.flops_per_step == pytest.approx(a.flops_per_step * 8 / 6)
    assert 0 < a.mfu < speed.GPU_MATMUL_EFFICIENCY  # the memory time only lowers it
    est = training_estimate(c, 4, 512, BIG_GPU)
    assert est["weights"] == 4 * est["params"]  # bf16 autocast keeps fp32 weights
    assert est["peak"] > est["total"]


def test_decode_is_bandwidth_bound_at_batch_one_and_faster_in_fewer_bytes():
    c = get_preset("smollm2-135m")
    fp32 = inference_estimate(c, BIG_GPU, context=1024, weight_format="fp32")
    q4 = inference_estimate(c, BIG_GPU, context=1024, weight_format="q4_1")
    assert fp32.bound == "bandwidth" and q4.decode_tokens_per_s > fp32.decode_tokens_per_s
    assert fp32.weight_bytes == 4 * training_estimate(c, 1, 1, BIG_GPU)["params"]
    with pytest.raises(LmforgeError, match="context"):
        inference_estimate(c, BIG_GPU, context=c.block_size + 1)
    with pytest.raises(LmforgeError, match="known formats"):
        inference_estimate(c, BIG_GPU, weight_format="q3_k")


def test_named_gpus_and_an_unknown_one():
    assert gpu("H100").name == "h100" and gpu("a100-80gb").memory_bytes == 80 * 10**9
    with pytest.raises(LmforgeError, match="known: h200"):
        gpu("voodoo-5")


def test_measured_training_peak_is_within_a_quarter_of_the_prediction(tmp_path):
    """In a fresh process (the kernel's peak RSS is per process): predicted peak over the RSS
    before the model vs measured. Memory, not time: speed is checked by bench/bench_estimate.py."""
    env = {**os.environ, "LMFORGE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "lmforge", "estimate", "--model", "llama-tiny", "--batch-size", "2",
                          "--seq-len", "256", "--measure", "--json"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    m = result["measured"]["train"]
    measured = m["peak_rss_bytes"] - m["baseline_rss_bytes"]
    assert 0.75 < result["train"]["peak"] / measured < 1.25, (result["train"]["peak"], measured)
    recorded = json.loads((tmp_path / "measured.json").read_text())
    (figures,) = recorded.values()
    assert figures["llama-tiny|train|b2|256"]["tokens_per_s"] == m["tokens_per_s"]
    # An unreadable measurements file is refused in one line, never silently replaced.
    (tmp_path / "measured.json").write_text("{torn")
    again = subprocess.run([sys.executable, "-m", "lmforge", "estimate", "--model", "tiny", "--batch-size", "1",
                            "--seq-len", "8", "--measure"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert again.returncode == 1 and "measured.json: not a measurements file" in again.stderr
    assert (tmp_path / "measured.json").read_text() == "{torn"


def _cpu(memory: int = 24 * 10**9) -> Hardware:
    return Hardware("test cpu", "cpu", memory, 2e11, 4e10, "test", elementwise_bandwidth=8e9)


@pytest.fixture
def no_timing(monkeypatch):
    monkeypatch.setattr(speed, "matmul_efficiency", lambda config, hw, rows: 0.8)


def test_choose_for_chat_ranks_the_pretrained_model_first_and_presets_by_size(no_timing):
    verdicts = choose("chat", _cpu())
    usable = [v for v in verdicts if not v.rejected]
    assert usable[0].kind == "pretrained" and usable[0].name == "smollm2-135m-instruct"
    assert usable[0].quality  # measured figures, each with a source
    presets = [v for v in usable if v.kind == "preset"]
    assert [v.params for v in presets] == sorted((v.params for v in presets), reverse=True)
    seq2seq = {v.name: v for v in verdicts if PRESETS.get(v.name) and PRESETS[v.name].is_encoder_decoder}
    assert seq2seq and all("encoder-decoder" in " ".join(v.rejected) for v in seq2seq.values())


def test_choose_for_translation_rejects_an_english_only_model(no_timing):
    verdicts = {(v.name, v.weight_format): v for v in choose("translation", _cpu())}
    assert "English-only" in " ".join(verdicts[("smollm2-135m-instruct", "q4_1")].rejected)
    assert not verdicts[("seq2seq-tiny", "fp32")].rejected


def test_choose_rejects_what_does_not_fit_or_is_too_slow(no_timing):
    tight = choose("chat", _cpu(), ram_bytes=parse_size("100M"))
    assert all(any(r.startswith("needs") for r in v.rejected) for v in tight)
    slow = [v for v in choose("code", _cpu(), latency_ms=0.01) if v.kind == "pretrained"]
    assert all("--latency-ms 0.01" in " ".join(v.rejected) for v in slow)


def test_choose_prefers_a_measured_figure(no_timing):
    measured = {"tiny|train|b8|256": {"model": "tiny", "mode": "train", "batch_size": 8, "seq_len": 256,
                                       "tokens_per_s": 1234.5, "step_seconds": 1.0},
                "smollm2-135m-instruct|decode|b1|128|q8_0": {"model": "smollm2-135m-instruct", "mode": "decode",
                                                             "weights": "q8_0", "batch_size": 1, "context": 128,
                                                             "tokens_per_s": 100.0, "step_seconds": 0.01}}
    verdicts = {(v.name, v.weight_format): v for v in choose("code", _cpu(), measured=measured)}
    tiny, q8 = verdicts[("tiny", "fp32")], verdicts[("smollm2-135m-instruct", "q8_0")]
    assert tiny.measured == "batch 8 x 256" and tiny.speed_value == 1234.5
    assert q8.measured == "batch 1, context 128" and q8.speed_value == pytest.approx(10.0)  # ms a token
    assert not verdicts[("smollm2-135m-instruct", "fp32")].measured


def test_parse_size():
    assert parse_size("8G") == 8 * 10**9 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("512m") == 512 * 10**6 and parse_size("1000") == 1000
    with pytest.raises(LmforgeError, match="--ram"):
        parse_size("lots")


def test_cli_choose_and_estimate_for_a_named_gpu(cli):
    r = cli("choose", "--gpu", "h100", "--task", "code")
    assert r.code == 0, r.err
    assert "h100" in r.out and " 1  smollm2-135m-instruct" in r.out and "rejected:" in r.out
    r = cli("estimate", "--model", "smollm2-135m-instruct", "--gpu", "a100-80gb", "--inference", "--weights", "q4_1",
            "--context", "2048", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["inference"]["kv_cache_bytes"] == kv_cache_bytes(get_preset("smollm2-135m"), 1, 2048, 2)
    assert out["train"]["tokens_per_s"] > 0 and "a100-80gb" in out["hardware"]


def test_cli_errors_are_one_line(cli):
    one_line_error(cli("choose", "--task", "poetry", "--gpu", "t4"), "--task 'poetry'", "chat")
    one_line_error(cli("estimate", "--gpu", "voodoo-5"), "voodoo-5", "known: h200")
    one_line_error(cli("choose", "--ram", "lots", "--gpu", "t4"), "--ram 'lots'")
    one_line_error(cli("estimate", "--model", "tiny", "--gpu", "t4", "--measure"), "--measure")
    one_line_error(cli("estimate", "--model", "tiny", "--gpu", "t4", "--inference", "--weights", "q3_k"), "q3_k")


def test_every_named_gpu_is_offered_in_the_help(cli):
    r = cli("choose", "--help")
    flat = " ".join(r.out.split())
    assert all(name in flat for name in GPUS)
    assert set(TASK_CONTEXT) == {"chat", "code", "translation"}
