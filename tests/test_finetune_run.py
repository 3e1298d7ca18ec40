"""The finetune run end to end on a tiny model: CLI, LoRA and full, exact resume, adapters loaded
on their base, merge, export, bad input."""

import json

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from lmforge.errors import LmforgeError
from lmforge.interop.registry import load_model
from lmforge.model.lora import ADAPTER_CONFIG, ADAPTER_FILE, LoRAConfig, LoRALinear
from lmforge.train.config import FinetuneConfig, FinetuneTrainConfig
from lmforge.train.finetune import finetune
from lmforge.train.metrics import read_metrics

FACTS = [("What colour is the sky?", "The sky is blue."), ("What colour is grass?", "Grass is green."),
         ("What colour is snow?", "Snow is white."), ("What colour is coal?", "Coal is black.")]


def chats(n):
    return [{"messages": [{"role": "user", "content": FACTS[i % 4][0]}, {"role": "assistant", "content": FACTS[i % 4][1]}]}
            for i in range(n)]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "chats.jsonl", chats(24))


def cfg(**kw):
    base = dict(max_steps=8, batch_size=4, block_size=64, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=2,
                eval_batches=2, checkpoint_every=4, early_stop=0, device="cpu")
    return FinetuneTrainConfig(**{**base, **kw})


def losses(run):
    return [float(r["train_loss"]) for r in read_metrics(run / "metrics.csv")]


def test_cli_lora_run_writes_small_adapters_that_load_on_their_base(cli, tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    r = cli("finetune", tiny_model_dir, "--data", data, "-o", run, "--max-steps", 8, "--batch-size", 4, "--block-size", 64,
            "--lr", 1e-2, "--warmup-steps", 1, "--eval-every", 2, "--eval-batches", 2, "--lora.rank", 4, "--no-progress")
    assert r.code == 0, r.err
    assert "trainable parameters" in r.out and "val loss" in r.out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["best_val_loss"] < summary["start_val_loss"] - 0.25
    assert 0 < summary["trainable_params"] < summary["total_params"] / 5
    # The final step is handed over (--select final, the default); no best/ to load instead.
    assert summary["handed_over"] == {"checkpoint": "checkpoints/step-000008", "step": 8, "why": "final step (--select final)"}
    assert "handed over: checkpoints/step-000008" in r.out and not (run / "best").exists()
    best = run / "checkpoints" / "step-000008"
    assert (best / ADAPTER_FILE).is_file() and not (best / "model.safetensors").exists()
    assert (best / ADAPTER_FILE).stat().st_size < 4 * summary["trainable_params"] + 10_000  # the adapters alone
    meta = json.loads((best / ADAPTER_CONFIG).read_text())
    assert meta["lora"]["rank"] == 4 and meta["base_model"] == str(tiny_model_dir.resolve())
    # The run dir loads as a model: base + adapters merged; equal to applying them by hand.
    merged = load_model(run).model
    unmerged = load_model(run, merge=False).model
    assert any(isinstance(m, LoRALinear) for m in unmerged.modules())
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    x = torch.randint(0, merged.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], unmerged(x)[0], atol=1e-4, rtol=1e-4)
        base = load_model(tiny_model_dir).model
        assert (merged(x)[0] - base(x)[0]).abs().max() > 1e-2  # training changed it
    assert (run / "report.md").is_file() and (run / "loss.png").is_file()


def test_lora_resume_continues_exactly(tiny_model_dir, data, tmp_path):
    lora = LoRAConfig(rank=4, dropout=0.1)  # dropout: RNG state must resume too
    full = finetune(str(tiny_model_dir), data, tmp_path / "full", FinetuneConfig(), cfg(), lora, progress=False, sample_count=0)
    half = finetune(str(tiny_model_dir), data, tmp_path / "half", FinetuneConfig(), cfg(), lora, progress=False,
                    sample_count=0, pause_at=4)
    assert half["steps"] == 4 and half["stopped_because"] == "paused"
    rest = finetune(str(tiny_model_dir), data, tmp_path / "half", FinetuneConfig(), cfg(), lora, progress=False,
                    sample_count=0, resume=True)
    assert rest["steps"] == full["steps"] == 8
    np.testing.assert_allclose(losses(tmp_path / "half"), losses(tmp_path / "full"), rtol=0, atol=1e-6)
    assert rest["best_val_loss"] == pytest.approx(full["best_val_loss"], abs=1e-6)


def test_full_finetune_trains_every_weight_and_saves_a_model_dir(tiny_model_dir, data, tmp_path):
    s = finetune(str(tiny_model_dir), data, tmp_path / "run", FinetuneConfig(method="full", select="best"),
                 cfg(lr=3e-3, max_steps=6), LoRAConfig(), progress=False, sample_count=1)
    assert s["handed_over"]["checkpoint"] == "best" and s["handed_over"]["step"] == s["best_step"]
    assert s["trainable_params"] == s["total_params"] and s["best_val_loss"] < s["start_val_loss"]
    best = tmp_path / "run" / "best"
    assert (best / "model.safetensors").is_file() and not (best / ADAPTER_FILE).exists()
    assert len(s["samples"]) == 1 and s["samples"][0]["prompt"].startswith("<|im_start|>")


def test_merge_then_export_to_transformers(cli, tiny_model_dir, data, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    finetune(str(tiny_model_dir), data, tmp_path / "run", FinetuneConfig(), cfg(max_steps=4), LoRAConfig(rank=4),
             progress=False, sample_count=0)
    r = cli("merge", tmp_path / "run", "-o", tmp_path / "merged")
    assert r.code == 0, r.err
    assert "merged 8 adapted layers" in r.out
    r = cli("convert", tmp_path / "merged", tmp_path / "hf", "--to", "hf")
    assert r.code == 0, r.err
    ours = load_model(tmp_path / "run").model
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)
    # convert accepts the LoRA run directly too (merged on the way)
    r = cli("convert", tmp_path / "run", tmp_path / "m.gguf", "--to", "gguf")
    assert r.code == 0, r.err


def test_bad_input(cli, tiny_model_dir, data, tmp_path):
    r = cli("finetune", tiny_model_dir, "--data", data, "-o", tmp_path / "r", "--method", "qlora")
    assert r.code != 0 and "qlora" in r.err
    r = cli("finetune", tiny_model_dir, "-o", tmp_path / "r")
    assert r.code == 1 and "--data is required" in r.err
    r = cli("finetune", tiny_model_dir, "--data", tmp_path / "missing.jsonl", "-o", tmp_path / "r")
    assert r.code == 1 and "missing.jsonl" in r.err
    r = cli("finetune", "no-such-model", "--data", data, "-o", tmp_path / "r")
    assert r.code == 1 and "no-such-model: no such path, and not a known model name" in r.err and "smollm2-135m-instruct" in r.err
    r = cli("merge", tiny_model_dir, "-o", tmp_path / "m")
    assert r.code == 1 and "not a LoRA run or adapter dir" in r.err and not (tmp_path / "m").exists()
    # An adapter whose base has gone: the error names both.
    finetune(str(tiny_model_dir), data, tmp_path / "run", FinetuneConfig(), cfg(max_steps=2), LoRAConfig(rank=2),
             progress=False, sample_count=0)
    meta_file = tmp_path / "run" / "checkpoints" / "step-000002" / ADAPTER_CONFIG
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(LmforgeError, match=r"step-000002: cannot load its base model .*gone"):
        load_model(tmp_path / "run")


def fixed_chats(engine, path, *args, **kw):
    write_jsonl(path, chats(6)[::-1])


def contradicting_chats(engine, path, *args, **kw):
    """Answers the training data teaches against: their loss can only rise."""
    write_jsonl(path, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACTS[(i + 1) % 4][1]}]}
                       for i, (q, _) in enumerate(FACTS * 3)])


def test_retention_guard_refuses_drifted_checkpoints(monkeypatch, tiny_model_dir, data, tmp_path):
    import lmforge.train.replay as replay

    # A base that knows other answers well (full fine-tune on them), then a run that teaches
    # ours: its loss on the base's answers must rise. (A random tiny model never finishes a
    # reply, so the check gets fixed chats instead of generated ones.)
    contradicting_chats(None, tmp_path / "other.jsonl")
    finetune(str(tiny_model_dir), tmp_path / "other.jsonl", tmp_path / "base", FinetuneConfig(method="full", replay=0.0,
             retention_tolerance=0.0, val_fraction=0.25), cfg(max_steps=20, lr=3e-3, eval_every=20, batch_size=3),
             LoRAConfig(), progress=False, sample_count=0)
    monkeypatch.setattr(replay, "write_retention", contradicting_chats)
    monkeypatch.setattr(replay, "write_replay", lambda engine, count, path, **kw: fixed_chats(engine, path))
    base = str(tmp_path / "base")
    strict = finetune(base, data, tmp_path / "strict", FinetuneConfig(retention_tolerance=0.05, replay=0.0, select="best",
                                                                      retention_guard=True),
                      cfg(early_stop=2, max_steps=12), LoRAConfig(rank=4), progress=False, sample_count=0)
    rows = read_metrics(tmp_path / "strict" / "metrics.csv")
    retention = [float(r["retention_loss"]) for r in rows if r["retention_loss"]]
    assert retention[-1] > strict["retention_start"] + 0.05, (strict["retention_start"], retention)
    assert strict["stopped_because"] == "early_stop" and strict["steps"] < 12
    assert (tmp_path / "strict" / "retention.jsonl").is_file() and not (tmp_path / "strict" / "replay.jsonl").exists()
    loose = finetune(base, data, tmp_path / "loose", FinetuneConfig(retention_tolerance=100.0), cfg(),
                     LoRAConfig(rank=4), progress=False, sample_count=0)
    assert loose["best_step"] == 8 and loose["steps"] == 8 and loose["examples"]["replay"] == 6
