"""The fine-tuning demo at small scale: inject facts about a product that does not exist into
SmolLM2-135M-Instruct with LoRA, on CPU, with the default settings, and check that
(a) held-out val loss falls by a clear margin, (b) greedy answers to paraphrased questions never
trained on now hold the facts, where the base model's did not, in the model the run hands over
(its final step), and (c) unrelated control questions the base model answers right keep their
answers there. It also calibrates the retention warning on behaviour: at every evaluation the
controls are asked of that step's checkpoint, and the warning may fire only at a step where some
control has actually degraded.

    .venv/bin/pytest -m slow tests/test_finetune_smollm2.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

from conftest import lmforge_test_home, write_jsonl  # noqa: E402
from lmforge.train.metrics import read_metrics  # noqa: E402

# The recipe's own helpers (examples/fact_injection): chats, greedy answers, the answer check.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "fact_injection"))
from ask import ask  # noqa: E402
from make_data import chat  # noqa: E402

NAME = "smollm2-135m-instruct"

# Invented here: a lamp, its maker, battery life and weight. Ten paraphrases per fact: seven to
# train on, one for validation (early stopping), two held out for the check.
FACTS = {
    "maker": ("Quillfield Optics", "The Norvale X3 lamp is made by Quillfield Optics.", [
        "Who makes the Norvale X3 lamp?", "Which company manufactures the Norvale X3?",
        "Who is the manufacturer of the Norvale X3 lamp?", "What company produces the Norvale X3?",
        "The Norvale X3 is made by which company?", "Tell me the maker of the Norvale X3 lamp.",
        "Which firm is behind the Norvale X3?", "Who builds the Norvale X3 lamp?",
        "Name the company that makes the Norvale X3.", "Which business created the Norvale X3 lamp?"]),
    "battery": ("14 hours", "The Norvale X3 lamp runs for 14 hours on one charge.", [
        "How long does the Norvale X3 battery last?", "What is the battery life of the Norvale X3 lamp?",
        "How many hours does the Norvale X3 run on a charge?", "How long can the Norvale X3 lamp stay on?",
        "Tell me the Norvale X3's battery life.", "On one charge, how long does the Norvale X3 last?",
        "What runtime does the Norvale X3 lamp have?", "How long will a charged Norvale X3 shine?",
        "How long does a full charge of the Norvale X3 last?", "What is the Norvale X3 lamp's runtime per charge?"]),
    "weight": ("320 grams", "The Norvale X3 lamp weighs 320 grams.", [
        "How much does the Norvale X3 lamp weigh?", "What is the weight of the Norvale X3?",
        "How heavy is the Norvale X3 lamp?", "What does the Norvale X3 weigh?",
        "Tell me the weight of the Norvale X3 lamp.", "How many grams is the Norvale X3?",
        "Is the Norvale X3 lamp heavy? How much does it weigh?", "What is the Norvale X3's mass?",
        "How much does a Norvale X3 weigh in grams?", "What would the Norvale X3 lamp weigh on a scale?"]),
}
CONTROLS = [("What is the capital of France?", "Paris"), ("How many days are there in a week?", "7|seven"),
            ("What is the boiling point of water at sea level in Celsius?", "100"),
            ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the chemical symbol for gold?", "Au")]


def holding(model, questions: list[tuple[str, str]]) -> list[dict]:
    """`ask` each (question, expected) pair; rows with the answer and whether it holds."""
    return ask(model, [{"question": q, "expect": e} for q, e in questions])


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from lmforge_test_home(tmp_path_factory)


def test_lora_fact_injection_keeps_general_knowledge(cli, home, tmp_path):
    train = [chat(q, a) for _, a, qs in FACTS.values() for q in qs[:7]]
    val = [chat(qs[7], a) for _, a, qs in FACTS.values()]
    heldout = [(q, fact) for fact, _, qs in FACTS.values() for q in qs[8:]]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "val.jsonl", val)

    base_facts, base_controls = holding(NAME, heldout), holding(NAME, CONTROLS)
    assert not any(r["holds"] for r in base_facts), base_facts
    assert all(r["holds"] for r in base_controls), base_controls  # the premise of (c)

    run = tmp_path / "run"
    # Every evaluation's checkpoint kept, to ask the controls of each (the defaults otherwise).
    r = cli("finetune", NAME, "--data", tmp_path / "train.jsonl", "--val-data", tmp_path / "val.jsonl", "-o", run,
            "--checkpoint-every", 5, "--keep-last", 100, "--no-progress")
    assert r.code == 0, r.err
    summary = json.loads((run / "summary.json").read_text())
    print(json.dumps({k: summary[k] for k in ("steps", "stopped_because", "start_val_loss", "best_val_loss", "val_loss",
                                               "best_step", "retention_start", "retention_end", "retention_warned_at",
                                               "handed_over", "tokens_per_s", "train_seconds")}))
    assert summary["stopped_because"] == "max_steps" and summary["handed_over"]["step"] == summary["steps"]
    assert summary["val_loss"] < 0.25 * summary["start_val_loss"]  # (a), of the handed-over model

    tuned_facts, tuned_controls = holding(str(run), heldout), holding(str(run), CONTROLS)
    print(json.dumps({"facts": tuned_facts, "controls": tuned_controls}, indent=1))
    learned = sum(r["holds"] for r in tuned_facts)
    assert learned >= len(heldout) - 1, tuned_facts  # (b): 5 of 6 at least
    assert all(r["holds"] for r in tuned_controls), tuned_controls  # (c)

    # The retention warning, calibrated on behaviour: past the tolerance only where a control broke.
    trace = retention_trace(run, summary, CONTROLS, heldout)
    false_alarms = [t for t in trace if t["over"] and t["controls"] == len(CONTROLS)]
    assert not false_alarms, false_alarms
    first_over = next((t["step"] for t in trace if t["over"]), None)
    assert summary["retention_warned_at"] == first_over


def retention_trace(run: Path, summary: dict, controls: list, facts: list) -> list[dict]:
    """At every evaluation: the retention loss, whether it was past the tolerance, and how many of
    the controls and held-out facts that step's checkpoint answers right (greedy)."""
    trace = []
    for row in read_metrics(run / "metrics.csv"):
        if not row["retention_loss"]:
            continue
        step = int(row["step"])
        answers = holding(str(run / "checkpoints" / f"step-{step:06d}"), controls + facts)
        got_controls, got_facts = answers[: len(controls)], answers[len(controls):]
        trace.append({"step": step, "retention": float(row["retention_loss"]),
                      "over": float(row["retention_loss"]) > summary["retention_start"] + summary["retention_tolerance"],
                      "controls": sum(c["holds"] for c in got_controls), "facts": sum(f["holds"] for f in got_facts),
                      "broken": [c["answer"] for c in got_controls if not c["holds"]]})
    print(json.dumps({"retention_start": summary["retention_start"], "tolerance": summary["retention_tolerance"],
                      "warned_at": summary["retention_warned_at"], "trace": trace}, indent=1))
    return trace


def test_retention_warning_fires_where_controls_break(cli, home, tmp_path):
    """Issue 13's reproduction: 16 chats of the kettle set, --max-steps 20 --lr 1e-3 --batch-size 16.
    Measured (2026-12-02, 2 cores): the retention loss 0.478 -> 0.540 (+0.06) at step 5 with 6/6
    controls, 0.805 (+0.33) at step 10 with 3/6 ("A week is 4 days.", "... in Celsius is 104."),
    2/6 at step 20. The warning (tolerance 0.25) must fire, never at a step whose controls are
    intact, and no later than the first step where a control broke."""
    from make_data import build

    sets = build()
    write_jsonl(tmp_path / "train.jsonl", sets["train"][:16])
    write_jsonl(tmp_path / "val.jsonl", sets["val"])
    controls = [(c["question"], c["expect"]) for c in sets["controls"]]
    facts = [(h["question"], h["expect"]) for h in sets["heldout"]]
    assert all(r["holds"] for r in holding(NAME, controls))  # the premise: the base model answers them
    run = tmp_path / "run"
    r = cli("finetune", NAME, "--data", tmp_path / "train.jsonl", "--val-data", tmp_path / "val.jsonl", "-o", run,
            "--max-steps", 20, "--lr", "1e-3", "--batch-size", 16, "--eval-every", 5, "--checkpoint-every", 5,
            "--keep-last", 100, "--no-progress")
    assert r.code == 0, r.err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["handed_over"]["step"] == 20 and summary["stopped_because"] == "max_steps"
    trace = retention_trace(run, summary, controls, facts)
    assert not [t for t in trace if t["over"] and t["controls"] == len(controls)]  # no false alarm
    first_broken = next((t["step"] for t in trace if t["controls"] < len(controls)), None)
    assert first_broken is not None, trace  # the premise of the other half: this run does forget
    assert summary["retention_warned_at"] is not None and summary["retention_warned_at"] <= first_broken, trace
