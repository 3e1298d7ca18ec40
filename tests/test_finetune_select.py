"""What a fine-tuning run hands over: its final step by default (--select final), the lowest val
loss with --select best; `stopped_because` says early_stop only when early stopping cut the run
short; the retention loss is measured and warned about once, and vetoes best/ only with
--retention-guard."""

import json

import pytest
import torch

from conftest import write_jsonl
from lmforge.errors import LmforgeError
from lmforge.interop.registry import load_model, resolve_model_dir
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.model.lora import LoRAConfig
from lmforge.train.config import FinetuneConfig, FinetuneTrainConfig, TrainConfig
from lmforge.train.finetune import finetune
from lmforge.train.metrics import read_metrics
from lmforge.train.sft import Example, SFTBatches
from lmforge.train.trainer import RetentionCheck, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32)


# -- the Trainer's decisions, with scripted evaluations -------------------------------------------

def scripted_trainer(tmp_path, val, retention=None, *, guard=False, keep_best=True, **cfg):
    """A Trainer on a tiny model whose evaluations return `val` (and `retention`) in order."""
    torch.manual_seed(0)
    model = GPT(CFG)
    ex = [Example(list(range(1, 9)), [True] * 8, f"ex{i}") for i in range(4)]
    data = SFTBatches(ex, ex, batch_size=2, grad_accum=1, pad_id=0, seed=0)
    check = RetentionCheck(data, tolerance=0.1, guard=guard) if retention is not None else None
    config = TrainConfig(**{**dict(max_steps=4, batch_size=2, eval_every=2, checkpoint_every=0, warmup_steps=0,
                                   device="cpu", log_every=1), **cfg})
    trainer = Trainer(model, config, data, tmp_path, write_model=lambda folder: (folder / "model").write_text("m"),
                      param_groups=[{"params": list(model.parameters())}], flops_per_token=1.0, tokens_per_step=1,
                      progress=False, retention=check, keep_best=keep_best)
    val_it, ret_it = iter(val), iter(retention or [])
    trainer.evaluate = lambda data=None: next(val_it) if data is None else next(ret_it)
    return trainer


def test_no_early_stop_is_reported_at_the_last_requested_step(tmp_path):
    # val rises at the last eval: one eval without improvement = --early-stop 1, but nothing is cut short.
    result = scripted_trainer(tmp_path, [1.0, 2.0], early_stop=1).fit()
    assert result.step == 4 and result.stopped_because == "max_steps"


def test_early_stop_is_reported_when_it_cuts_the_run_short(tmp_path):
    result = scripted_trainer(tmp_path, [1.0, 2.0, 3.0, 4.0], early_stop=1, max_steps=8).fit()
    assert result.step == 4 and result.stopped_because == "early_stop" and result.best_step == 2


def test_retention_warns_once_and_vetoes_nothing_without_the_guard(tmp_path, capsys):
    # start 1.0, tolerance 0.1: steps 4 and 6 pass it, step 8 is back under.
    trainer = scripted_trainer(tmp_path, [3.0, 2.0, 1.5, 1.0], [1.0, 1.05, 1.2, 1.3, 1.05], max_steps=8, early_stop=1,
                               keep_best=False)
    result = trainer.fit()
    out = capsys.readouterr()
    warnings = [line for line in (out.out + out.err).splitlines() if "retention loss" in line]
    assert len(warnings) == 1 and "step 4:" in warnings[0] and "warning" in warnings[0], warnings
    assert result.retention_warned_at == 4 and result.best_step == 8 and result.stopped_because == "max_steps"
    assert not (tmp_path / "best").exists()  # keep_best=False: the caller hands over the final step
    rows = [r for r in read_metrics(tmp_path / "metrics.csv") if r["retention_loss"]]
    assert [float(r["retention_loss"]) for r in rows] == [1.05, 1.2, 1.3, 1.05]


def test_retention_guard_vetoes_best_and_counts_toward_early_stop(tmp_path):
    trainer = scripted_trainer(tmp_path, [3.0, 2.0, 1.5, 1.0], [1.0, 1.05, 1.2, 1.3, 1.05], max_steps=8, early_stop=2,
                               guard=True)
    result = trainer.fit()
    # steps 4 and 6 improve val loss but drifted: not best, and two such evals stop the run.
    assert result.best_step == 2 and result.stopped_because == "early_stop" and result.step == 6
    assert (tmp_path / "best" / "model").is_file()


# -- the finetune run: what it hands over and says ----------------------------------------------

FACTS = [("What colour is the sky?", "The sky is blue."), ("What colour is grass?", "Grass is green."),
         ("What colour is snow?", "Snow is white."), ("What colour is coal?", "Coal is black.")]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS * 6])


def contradicting_chats(engine, path, *args, **kw):
    """Stands in for the base model's replies (a random tiny model finishes none): answers the
    training teaches against, so their loss rises as the run learns its facts."""
    write_jsonl(path, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACTS[(i + 1) % 4][1]}]}
                       for i, (q, _) in enumerate(FACTS)])


def cfg(**kw):
    return FinetuneTrainConfig(**{**dict(max_steps=8, batch_size=4, block_size=64, lr=1e-2, min_lr=1e-3, warmup_steps=1,
                                         eval_every=2, eval_batches=2, checkpoint_every=4, device="cpu"), **kw})


def logits(model_spec, x):
    with torch.no_grad():
        return load_model(model_spec).model(x)[0]


def test_default_hands_over_the_final_step_and_warns_on_drift(monkeypatch, capsys, tiny_model_dir, data, tmp_path):
    import lmforge.train.replay as replay

    monkeypatch.setattr(replay, "write_retention", contradicting_chats)
    run = tmp_path / "run"
    s = finetune(str(tiny_model_dir), data, run, FinetuneConfig(replay=0.0, retention_tolerance=0.01), cfg(lr=0.05),
                 LoRAConfig(rank=4), progress=False, sample_count=1)
    out = capsys.readouterr()
    assert s["steps"] == 8 and s["stopped_because"] == "max_steps"
    assert s["handed_over"] == {"checkpoint": "checkpoints/step-000008", "step": 8, "why": "final step (--select final)"}
    assert not (run / "best").exists() and resolve_model_dir(run) == run / "checkpoints" / "step-000008"
    x = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(logits(run, x), logits(run / "checkpoints" / "step-000008", x))
    # Retention: measured at every eval, one warning at the first that passes the tolerance.
    rows = [r for r in read_metrics(run / "metrics.csv") if r["retention_loss"]]
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    first = next(int(r["step"]) for r in rows if float(r["retention_loss"]) > s["retention_start"] + 0.01)
    assert s["retention_warned_at"] == first
    warnings = [line for line in (out.out + out.err).splitlines() if "retention loss" in line and "warning" in line]
    assert len(warnings) == 1 and f"step {first}:" in warnings[0]
    assert s["retention_end"] == pytest.approx(float(rows[-1]["retention_loss"]))
    report = (run / "report.md").read_text()
    assert "checkpoints/step-000008: final step" in report and f"passed at step {first}" in report
    assert json.loads((run / "summary.json").read_text())["handed_over"]["checkpoint"] == "checkpoints/step-000008"


def test_select_best_hands_over_the_lowest_val_loss(cli, tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    r = cli("finetune", tiny_model_dir, "--data", data, "-o", run, "--select", "best", "--max-steps", 8, "--batch-size", 4,
            "--block-size", 64, "--lr", 0.05, "--warmup-steps", 1, "--eval-every", 2, "--eval-batches", 2,
            "--replay", 0, "--retention-tolerance", 0, "--lora.rank", 4, "--no-progress")
    assert r.code == 0, r.err
    s = json.loads((run / "summary.json").read_text())
    assert s["handed_over"]["checkpoint"] == "best" and s["handed_over"]["step"] == s["best_step"]
    assert "--select best" in s["handed_over"]["why"] and f"handed over: best (step {s['best_step']})" in r.out
    assert resolve_model_dir(run) == run / "best"
    x = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(logits(run, x), logits(run / "best", x))
    # A later --select final leg of the same run removes best/, so the run dir loads its final step.
    r = cli("finetune", tiny_model_dir, "-o", run, "--resume", "--select", "final", "--max-steps", 10, "--no-progress")
    assert r.code == 0, r.err
    assert not (run / "best").exists() and resolve_model_dir(run) == run / "checkpoints" / "step-000010"


def test_bad_selection_flags(cli, tiny_model_dir, data, tmp_path):
    r = cli("finetune", tiny_model_dir, "--data", data, "-o", tmp_path / "r", "--select", "last")
    assert r.code != 0 and "last" in r.err
    r = cli("finetune", tiny_model_dir, "--data", data, "-o", tmp_path / "r", "--retention-guard")
    assert r.code == 1 and "--retention-guard" in r.err and "--select best" in r.err
    with pytest.raises(LmforgeError, match="--retention-guard needs a --retention-tolerance above 0"):
        FinetuneConfig(select="best", retention_guard=True, retention_tolerance=0.0)
