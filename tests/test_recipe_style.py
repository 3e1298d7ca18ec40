"""`lmforge recipe run style` on a tiny model (the real one, SmolLM2, in the slow suite): the stages,
the report, continuing after an interruption, and the measures it reports."""

import json
from pathlib import Path

import pytest

from conftest import interrupt_first_finetune

from lmforge.errors import LmforgeError
from lmforge.recipes.style import Setting, StyleConfig, distinct_n, pick_prompts, run_style, split_text

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
SETTINGS = (Setting("greedy", 0.0), Setting("T=1.0 top-p 0.9", 1.0, top_p=0.9))


@pytest.fixture
def text(tmp_path):
    file = tmp_path / "style.txt"
    file.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return file


def small(tiny_model_dir, text, out, **kw) -> StyleConfig:
    base = dict(out=out, model=str(tiny_model_dir), text=text, max_steps=12, lr=1e-2, block_size=64, batch_size=4,
                prompts=2, seeds=2, max_new_tokens=12, settings=SETTINGS, progress=False)
    return StyleConfig(**{**base, **kw})


def test_distinct_n_counts_unique_ngrams():
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == 2 / 3
    assert distinct_n(["a b", "c d"], 2) == 1.0 and distinct_n(["a"], 2) is None


def test_split_and_prompts_come_from_the_held_out_tail():
    text = "".join(f"line number {i} of the text here\n" for i in range(200))
    train, val = split_text(text, 0.1, 10**6)
    assert train + val == text and val.startswith("\nline number 18") and len(val) < 0.11 * len(text)  # cut at a line break
    prompts = pick_prompts(val, 3)
    assert len(prompts) == 3 and all(p in val for p in prompts)
    with pytest.raises(LmforgeError, match="at least 2,000"):
        split_text("too short", 0.1, 10**6)


def test_style_recipe_end_to_end_and_continues_after_an_interruption(tiny_model_dir, text, tmp_path):
    out = tmp_path / "style"
    messages = []
    r = run_style(small(tiny_model_dir, text, out), echo=messages.append)
    # the tuned model reads the held-out text better than the random base
    assert r["val_perplexity"]["tuned"] < r["val_perplexity"]["base"]
    assert {(b["model"], b["setting"]) for b in r["by_setting"]} == {(m, s.name) for m in ("base", "tuned") for s in SETTINGS}
    greedy = [s for s in r["samples"] if s["setting"] == "greedy"]
    assert len(greedy) <= 2 * 2  # greedy draws one sample per prompt whatever the seeds
    sampled = [b for b in r["by_setting"] if b["setting"] != "greedy"]
    assert all(b["samples"] > 0 and 0 < b["distinct_1"] <= 1 for b in sampled)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Held-out text perplexity" in report and r["data"]["prompts"][0] in report
    assert (out / "style.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["finetune"]["steps"] == 12

    # an interruption after the fine-tune: the rerun reuses the finished stages
    (out / "stages" / "tuned.json").unlink()
    (out / "results.json").unlink()
    messages.clear()
    again = run_style(small(tiny_model_dir, text, out), echo=messages.append)
    assert any("finetune: done before" in m for m in messages) and any("base: done before" in m for m in messages)
    assert again["val_perplexity"] == r["val_perplexity"]

    # other settings on the same folder are refused
    with pytest.raises(LmforgeError, match="continuing it needs the same ones"):
        run_style(small(tiny_model_dir, text, out, lr=3e-3), echo=messages.append)


def test_an_interrupted_fine_tune_resumes_from_its_checkpoint(tiny_model_dir, text, tmp_path, monkeypatch):
    """Killed mid-training (here: paused at step 6 of 12), the same command continues the run
    from its checkpoint instead of starting it again."""
    calls = interrupt_first_finetune(monkeypatch, at=6)
    cfg = small(tiny_model_dir, text, tmp_path / "style")
    cfg.settings = SETTINGS[:1]
    with pytest.raises(KeyboardInterrupt):
        run_style(cfg)
    assert (tmp_path / "style" / "run" / "latest").exists() and not (tmp_path / "style" / "stages" / "finetune.json").exists()
    r = run_style(cfg)
    assert calls == [False, True] and r["finetune"]["steps"] == 12


@pytest.mark.slow
def test_style_recipe_on_smollm2_moves_it_toward_the_text(tmp_path):
    """The real model, the 24 steps of the measured run (README): the held-out Shakespeare reads
    better to the tuned model than to the base (perplexity; 8 steps were not enough: 20.72 -> 20.80),
    and the report holds both models' samples."""
    cfg = StyleConfig(out=tmp_path / "style", text=SHAKESPEARE, max_steps=24, max_train_chars=60_000, prompts=2, seeds=1,
                      max_new_tokens=16, settings=SETTINGS, progress=False)
    r = run_style(cfg, echo=lambda s: None)
    assert r["val_perplexity"]["tuned"] < r["val_perplexity"]["base"]
    assert {s["model"] for s in r["samples"]} == {"base", "tuned"}


def test_the_budget_covers_the_whole_recipe(tiny_model_dir, text, tmp_path):
    """No --max-steps: the base model's turn is timed first, and fine-tuning (its timing run
    included) gets the budget less that turn, the data, and the tuned model's predicted turn."""
    cfg = small(tiny_model_dir, text, tmp_path / "style", max_steps=0, budget=0.4)
    cfg.settings = SETTINGS[:1]
    said = []
    r = run_style(cfg, echo=said.append)
    stages = {p.stem: json.loads(p.read_text())["stage_seconds"] for p in (tmp_path / "style" / "stages").glob("*.json")}
    planned = r["finetune"]["train_minutes"] * 60
    # planned at the fine-tune's start: the stage's own first seconds (imports) are spent by then
    assert 24 - stages["data"] - 2.2 * stages["base"] - 3 <= planned <= 24 - stages["data"] - 2.2 * stages["base"] + 0.1
    assert any("budget 0.4 min:" in s and "the tuned model's samples and scoring" in s for s in said)
    assert any("calibration:" in s for s in said) and r["finetune"]["steps"] >= 8
