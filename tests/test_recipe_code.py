"""`lmforge recipe run code` reduced: a few standard-library files, a few steps, two hand-written
problems, our model beside another (the tiny fixture model) — the stages, the sandboxed scoring,
the report, and continuing after an interruption."""

import json

import pytest

from conftest import write_jsonl
from lmforge.data.embedded import stdlib_files
from lmforge.recipes.code import CodeRecipeConfig, predict_eval_seconds, run_code

pytestmark = pytest.mark.usefixtures("one_thread")

ADD = {"task_id": "t/add", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}
NONE = {"task_id": "t/none", "prompt": "def nothing():\n", "entry_point": "nothing",
        "test": "def check(candidate):\n    pass\n"}  # any completion that parses passes


def test_code_recipe_reduced(tmp_path, tiny_model_dir):
    problems = write_jsonl(tmp_path / "problems.jsonl", [ADD, NONE])
    inputs = tuple(str(p) for p in sorted(stdlib_files())[:200])
    cfg = CodeRecipeConfig(out=tmp_path / "out", max_steps=6, preset="tiny", vocab_size=300, batch_size=4, block_size=64,
                           inputs=inputs, compare=str(tiny_model_dir), compare_prompt="raw", problems=str(problems),
                           limit=0, samples=3,
                           temperature=0.8, max_new_tokens=16, progress=False)
    said = []
    r = run_code(cfg, echo=said.append)
    out = tmp_path / "out"
    assert r["pretrain"]["steps"] == 6 and set(r["evals"]) == {"ours", "llama"}  # the compared model by its folder's name
    assert (out / "eval-llama.json").is_file() and (out / "stages" / "eval-llama.json").is_file()
    for e in r["evals"].values():
        assert e["problems"] == 2 and e["samples"] == 6 and sum(e["outcomes"].values()) == 6
        assert 0.0 <= e["pass_at_k"]["pass@1"] <= 1.0 and "pass@10" not in e["pass_at_k"]  # 3 samples: no pass@10
        saved = json.loads(open(e["file"], encoding="utf-8").read())
        assert saved["kind"] == "code" and saved["samples"] == 6
    report = (out / "report.md").read_text()
    assert "| ours |" in report and "pass@1" in report and (out / "failures.png").stat().st_size > 1000

    # what the budget plans for our model's evaluation before it exists: 2 problems of 3 samples
    # fit one batch of 8; executing them costs what the compared model's 6 programs did
    predicted = predict_eval_seconds(cfg, out / "shards", r["evals"]["llama"])
    assert predicted["batches"] == 1 and predicted["execute_seconds"] == round(r["evals"]["llama"]["seconds"]["execute"], 3)
    assert predicted["decode_step_seconds"] > 0 and predicted["generate_seconds"] > 0 and predicted["seconds"] >= 0

    # an interruption after the pretraining: the rerun reuses data and pretrain, and scores again
    for name in r["evals"]:
        (out / "stages" / f"eval-{name}.json").unlink()
    said.clear()
    again = run_code(cfg, echo=said.append)
    assert any("pretrain: done before" in s for s in said) and again["pretrain"] == r["pretrain"]
