"""The Trainer and `lmforge pretrain`: schedule, optimizer groups, exact resume, checkpoints,
divergence, signals, logs and reports."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import write_jsonl
from lmforge.data.pack import PackConfig, pack_corpus
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.model.io import load_model_dir, write_model_files
from lmforge.tokenizer import TokenizerTrainConfig, save_tokenizer_dir, train_tokenizer
from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.train.pretrain import pretrain
from lmforge.train.trainer import Trainer

from conftest import SMALL  # noqa: E402  (the model of the `shards` fixture)


def small_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=12, batch_size=4, block_size=32, eval_every=4, eval_batches=2, checkpoint_every=4,
                log_every=1, warmup_steps=2, lr=3e-3, seed=7, keep_last=2)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # cosine midpoint
    lin = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.0, schedule="linear")
    assert lr_at(35, lin) == pytest.approx(0.75)
    const = TrainConfig(max_steps=110, warmup_steps=0, lr=0.5, schedule="constant")
    assert lr_at(100, const) == 0.5


def test_no_weight_decay_on_norms_biases_embeddings():
    model = GPT(ModelConfig(**{**SMALL, "norm": "layernorm", "bias": True, "position": "learned", "mlp": "gelu"}))
    opt = build_optimizer(model.configure_optimizer_groups(0.1), TrainConfig(), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        expect = p.dim() == 2 and "emb" not in name and "lm_head" not in name
        assert (id(p) in decayed) == expect, name
    sgd = build_optimizer(model.configure_optimizer_groups(0.1), TrainConfig(optimizer="sgd", momentum=0.8), torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8


def losses(run: Path) -> list[float]:
    return [float(r["train_loss"]) for r in read_metrics(run / "metrics.csv")]


def test_resume_continues_exactly(shards, tmp_path):
    data, model_file = shards
    full = pretrain(data, str(model_file), tmp_path / "full", small_cfg(), progress=False, sample_tokens=4)
    half = pretrain(data, str(model_file), tmp_path / "half", small_cfg(), progress=False, sample_tokens=4, pause_at=6)
    assert half["steps"] == 6 and half["stopped_because"] == "paused"
    assert (tmp_path / "half" / "latest").read_text().strip() == "step-000006"
    rest = pretrain(data, str(model_file), tmp_path / "half", small_cfg(), progress=False, sample_tokens=4, resume=True)
    assert rest["steps"] == 12 and full["steps"] == 12
    a, b = losses(tmp_path / "full"), losses(tmp_path / "half")
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert rest["best_val_loss"] == pytest.approx(full["best_val_loss"], abs=1e-6)
    assert rest["tokens_seen"] == full["tokens_seen"] == 12 * 4 * 32


def test_heap_policies_change_memory_not_numbers(shards, tmp_path):
    """--heap release and pool only change where memory lives (glibc's policy; saved activations
    copied into one buffer): the same losses, to the bit, and the run records the setting."""
    data, model_file = shards
    pretrain(data, str(model_file), tmp_path / "keep", small_cfg(max_steps=4), progress=False, sample_tokens=2)
    for heap in ("release", "pool"):
        pretrain(data, str(model_file), tmp_path / heap, small_cfg(max_steps=4, heap=heap), progress=False, sample_tokens=2)
        assert losses(tmp_path / "keep") == losses(tmp_path / heap), heap
        assert f"heap: {heap}" in (tmp_path / heap / "config.yaml").read_text()


def test_run_dir_contents(shards, tmp_path):
    data, model_file = shards
    s = pretrain(data, str(model_file), tmp_path / "r", small_cfg(), progress=False, sample_tokens=8)
    run = tmp_path / "r"
    rows = read_metrics(run / "metrics.csv")
    assert list(rows[0]) == ["step", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s", "mfu", "grad_norm", "tokens_seen", "elapsed_s", "retention_loss"]
    evals = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in evals] == [4, 8, 12]
    assert float(evals[0]["val_ppl"]) == pytest.approx(math.exp(float(evals[0]["val_loss"])))
    assert losses(run)[-1] < losses(run)[0]  # it learns
    assert [c.name for c in list_checkpoints(run)] == ["step-000008", "step-000012"]  # keep_last=2
    verify_checkpoint(latest_checkpoint(run))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 3e-3 and saved["model"]["n_embd"] == 32 and saved["model"]["vocab_size"] == 300
    assert (run / "best" / "model.safetensors").exists() and (run / "loss.png").stat().st_size > 10_000
    report = (run / "report.md").read_text()
    assert "unigram baseline" in report and "def fibonacci(n):" in report
    assert s["unigram_val_loss"] > 0 and json.loads((run / "summary.json").read_text())["steps"] == 12
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("val/loss")] == [4, 8, 12]


def test_corrupt_checkpoint_is_refused_naming_the_previous_good_one(shards, tmp_path):
    data, model_file = shards
    pretrain(data, str(model_file), tmp_path / "r", small_cfg(max_steps=8), progress=False, sample_tokens=4)
    weights = tmp_path / "r" / "checkpoints" / "step-000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(LmforgeError, match=r"step-000008/model.safetensors: .* \(truncated\); the previous good checkpoint is .*step-000004"):
        pretrain(data, str(model_file), tmp_path / "r", small_cfg(max_steps=12), progress=False, resume=True)
    s = pretrain(data, str(model_file), tmp_path / "r", small_cfg(max_steps=12), progress=False, sample_tokens=4,
                 resume_from=str(tmp_path / "r" / "checkpoints" / "step-000004"))
    assert s["steps"] == 12


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(**{**SMALL, "dropout": 0.0, "vocab_size": 50})
    data = torch.randint(0, 50, (40, 8, 17))

    class Fixed:
        def __init__(self, accum):
            self.accum = accum

        def train_batch(self, step, micro):
            b = data[step]
            part = b.chunk(self.accum)[micro]
            return part[:, :-1], part[:, 1:]

        def val_batches(self):
            yield data[-1][:, :-1], data[-1][:, 1:]

    runs = {}
    for accum in (1, 2):
        torch.manual_seed(1)
        model = GPT(config)
        cfg = TrainConfig(max_steps=5, batch_size=8 // accum, grad_accum=accum, eval_every=0, checkpoint_every=0,
                          log_every=1, warmup_steps=0, lr=1e-2)
        Trainer(model, cfg, Fixed(accum), tmp_path / str(accum), write_model=lambda f: write_model_files(model, f),
                param_groups=model.configure_optimizer_groups(0.1), flops_per_token=1.0, tokens_per_step=128,
                progress=False).fit()
        runs[accum] = losses(tmp_path / str(accum))
    np.testing.assert_allclose(runs[1], runs[2], rtol=0, atol=1e-5)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = ModelConfig(**{**SMALL, "vocab_size": 50})
    model = GPT(config)

    class Poisoned:
        def train_batch(self, step, micro):
            x = torch.randint(0, 50, (2, 16))
            if step == 5:
                model.tok_emb.weight.data[0, 0] = float("nan")
                x[0, 0] = 0
            return x, x

        def val_batches(self):
            yield torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long)

    cfg = TrainConfig(max_steps=10, batch_size=2, checkpoint_every=2, eval_every=0, warmup_steps=0, log_every=1)
    trainer = Trainer(model, cfg, Poisoned(), tmp_path, write_model=lambda f: write_model_files(model, f),
                      param_groups=model.configure_optimizer_groups(0.1), flops_per_token=1.0, tokens_per_step=32, progress=False)
    with pytest.raises(LmforgeError, match=r"loss is nan at step 6; the last good checkpoint is .*step-000004"):
        trainer.fit()
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    verify_checkpoint(latest_checkpoint(tmp_path))


def test_bad_runs_are_refused_up_front(shards, tmp_path):
    data, model_file = shards
    with pytest.raises(LmforgeError, match=r"--block-size 128 exceeds the model's context \(block_size 64\)"):
        pretrain(data, str(model_file), tmp_path / "a", small_cfg(block_size=128), progress=False)
    with pytest.raises(LmforgeError, match=r"needs about .* GB .* free; lower --batch-size"):
        pretrain(data, str(model_file), tmp_path / "b", small_cfg(batch_size=10**9), progress=False)
    pretrain(data, str(model_file), tmp_path / "c", small_cfg(max_steps=2), progress=False, sample_tokens=2)
    with pytest.raises(LmforgeError, match="already holds a run; pass --resume"):
        pretrain(data, str(model_file), tmp_path / "c", small_cfg(max_steps=2), progress=False)
    with pytest.raises(LmforgeError, match="nothing to resume"):
        pretrain(data, str(model_file), tmp_path / "d", small_cfg(), progress=False, resume=True)
    with pytest.raises(LmforgeError, match="unknown model preset 'huge'"):
        pretrain(data, "huge", tmp_path / "e", small_cfg(), progress=False)


def test_resume_refuses_shards_of_another_tokenizer(shards, tmp_path, stdlib_texts):
    data, model_file = shards
    pretrain(data, str(model_file), tmp_path / "r", small_cfg(max_steps=4), progress=False, sample_tokens=2)
    other = train_tokenizer(stdlib_texts[30:40], TokenizerTrainConfig(vocab_size=300), show_progress=False)
    save_tokenizer_dir(other, tmp_path / "tok2")
    write_jsonl(tmp_path / "c" / "a.jsonl", [{"text": t} for t in stdlib_texts[30:40]])
    pack_corpus([tmp_path / "c"], tmp_path / "tok2", tmp_path / "s2", PackConfig(val_fraction=0.2, workers=1), progress=False)
    with pytest.raises(LmforgeError, match="shards were made with tokenizer .* but checkpoint .* uses"):
        pretrain(tmp_path / "s2", str(model_file), tmp_path / "r", small_cfg(max_steps=8), progress=False, resume=True)


def test_cli_config_file_flags_and_resume(cli, shards, tmp_path):
    data, model_file = shards
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"data": str(data), "model": str(model_file),
                                        "train": {"max_steps": 6, "batch_size": 4, "block_size": 32, "lr": 0.002,
                                                  "eval_every": 3, "checkpoint_every": 3, "log_every": 1}}))
    r = cli("pretrain", "--config", run_yaml, "-o", tmp_path / "r", "--train.lr", "0.001", "--warmup-steps", "1",
            "--model.n-layer", "1", "--no-progress")
    assert r.code == 0, r.err
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.001 and saved["train"]["warmup_steps"] == 1 and saved["train"]["max_steps"] == 6
    # The model override reached the run's config and the model it trained (the file says 2 layers).
    assert SMALL["n_layer"] != 1 and saved["model"]["n_layer"] == 1
    model, config = load_model_dir(latest_checkpoint(tmp_path / "r"))
    assert config.n_layer == len(model.blocks) == 1
    assert "unigram baseline" in r.out
    # Resuming takes the saved config; a flag given now (a longer run) wins.
    r = cli("pretrain", "-o", tmp_path / "r", "--resume", "--max-steps", "9", "--no-progress")
    assert r.code == 0, r.err
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.001 and saved["train"]["max_steps"] == 9
    assert int(read_metrics(tmp_path / "r" / "metrics.csv")[-1]["step"]) == 9
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 1\n")
    r = cli("pretrain", "--config", bad, "-o", tmp_path / "x")
    assert r.code == 1 and "unknown settings train.lrr" in r.err


def _pretrain_proc(data, model_file, out, steps, every):
    return subprocess.Popen(
        [sys.executable, "-m", "lmforge", "pretrain", "--data", str(data), "--model", str(model_file), "-o", str(out),
         "--max-steps", str(steps), "--checkpoint-every", str(every), "--eval-every", "0", "--batch-size", "4",
         "--block-size", "32", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for_checkpoint(out: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list_checkpoints(out):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint appeared; rc={proc.poll()}")


def test_sigint_saves_a_final_checkpoint_and_exits_cleanly(shards, tmp_path):
    data, model_file = shards
    proc = _pretrain_proc(data, model_file, tmp_path / "r", 100000, 5)
    _wait_for_checkpoint(tmp_path / "r", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # stopped, not finished: scripts can tell
    assert "interrupted" in out
    assert "lmforge: error" not in err and "Traceback" not in err
    last = latest_checkpoint(tmp_path / "r")
    step = int(last.name.split("-")[1])
    assert step % 5 != 0 or step > 5  # a checkpoint at the interruption, not only the periodic ones
    assert int(read_metrics(tmp_path / "r" / "metrics.csv")[-1]["step"]) == step


def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(shards, tmp_path):
    data, model_file = shards
    proc = _pretrain_proc(data, model_file, tmp_path / "r", 100000, 3)
    _wait_for_checkpoint(tmp_path / "r", proc)
    time.sleep(1.0)
    proc.kill()
    proc.communicate()
    last = latest_checkpoint(tmp_path / "r")  # verified: complete, not half written
    step = int(last.name.split("-")[1])
    s = pretrain(data, str(model_file), tmp_path / "r", small_cfg(max_steps=step + 3, checkpoint_every=3, eval_every=0),
                 progress=False, sample_tokens=2, resume=True)
    assert s["steps"] == step + 3


def test_sgd_and_bf16_autocast_runs(shards, tmp_path):
    data, model_file = shards
    s = pretrain(data, str(model_file), tmp_path / "sgd", small_cfg(optimizer="sgd", lr=0.05, max_steps=8), progress=False, sample_tokens=2)
    l = losses(tmp_path / "sgd")
    assert l[-1] < l[0]
    s = pretrain(data, str(model_file), tmp_path / "bf16", small_cfg(precision="bf16", max_steps=2, eval_every=2), progress=False, sample_tokens=2)
    assert math.isfinite(s["best_val_loss"])


@pytest.mark.slow
def test_compiled_training_matches_eager(shards, tmp_path):
    data, model_file = shards
    cfg = dict(max_steps=6, eval_every=3)
    # No dropout: compiled code draws its masks from another generator than eager code does.
    nodrop = {"dropout": 0.0}
    pretrain(data, str(model_file), tmp_path / "eager", small_cfg(**cfg), model_overrides=nodrop, progress=False, sample_tokens=2)
    pretrain(data, str(model_file), tmp_path / "compiled", small_cfg(compile=True, **cfg), model_overrides=nodrop,
             progress=False, sample_tokens=2)
    np.testing.assert_allclose(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), rtol=1e-3)


def test_a_run_stopped_by_its_time_budget_is_evaluated(shards, tmp_path):
    """The budget runs out long before the first scheduled evaluation: the run must still end
    with a val loss and a best model (quickstart with a short --minutes relies on it)."""
    data, model_file = shards
    s = pretrain(data, str(model_file), tmp_path / "r", small_cfg(max_steps=1000, eval_every=500, checkpoint_every=0,
                 time_budget=1e-3), progress=False, sample_tokens=2)
    assert s["stopped_because"] == "time_budget" and s["steps"] == 1
    assert math.isfinite(s["best_val_loss"]) and s["best_step"] == 1 and (tmp_path / "r" / "best").is_dir()
    assert [r["val_loss"] != "" for r in read_metrics(tmp_path / "r" / "metrics.csv")] == [True]


def test_a_checkpoint_of_the_earlier_single_file_format_still_resumes(shards, tmp_path):
    """Checkpoints written before the optimizer state went through torch.distributed.checkpoint
    (one optimizer.safetensors keyed by parameter index, its scalars in trainer_state.json) resume
    exactly: the step-6 checkpoint is rewritten into that format here, then resumed."""
    from safetensors.torch import save_file

    from lmforge.manifest import write_manifest
    from lmforge.train.checkpoint import OPTIMIZER_DIR, OPTIMIZER_FILE, OPTIMIZER_META, STATE_FILE, load_optimizer
    from lmforge.train.distributed import SINGLE

    data, model_file = shards
    pretrain(data, str(model_file), tmp_path / "full", small_cfg(), progress=False, sample_tokens=4)
    pretrain(data, str(model_file), tmp_path / "old", small_cfg(), progress=False, sample_tokens=4, pause_at=6)
    ckpt = latest_checkpoint(tmp_path / "old")
    net = load_model_dir(ckpt)[0]
    opt = build_optimizer(net.configure_optimizer_groups(0.1), small_cfg(), torch.device("cpu"))
    load_optimizer(ckpt, net, opt, SINGLE)
    sd = opt.state_dict()  # the old writer: tensors by "state.<index>.<key>", the rest beside the trainer state
    tensors = {f"state.{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    scalars = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if not torch.is_tensor(v)}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    save_file(tensors, str(ckpt / OPTIMIZER_FILE))
    state = json.loads((ckpt / STATE_FILE).read_text())
    (ckpt / STATE_FILE).write_text(json.dumps({**state, "optimizer": {"param_groups": groups, "scalars": scalars}}))
    import shutil

    shutil.rmtree(ckpt / OPTIMIZER_DIR)
    (ckpt / OPTIMIZER_META).unlink()
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt)
    pretrain(data, str(model_file), tmp_path / "old", small_cfg(), progress=False, sample_tokens=4, resume=True)
    np.testing.assert_allclose(losses(tmp_path / "old"), losses(tmp_path / "full"), rtol=0, atol=1e-6)
