"""`lmforge eval tasks`: accuracy and standard error against an independent computation from the
model's own log-probabilities (a plain forward pass, no Engine), generative exact match, the
built-in tasks, bad input with file:line."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from conftest import write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")


def plain_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """Sum of log p(cont | ctx) from one full forward pass, cut to the context as lm-eval does."""
    import torch

    block = model.config.block_size
    whole = (ctx + cont)[-(block + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    logp = torch.log_softmax(logits[0].double(), -1)
    n = len(cont)
    targets = torch.tensor(whole[-n:])
    return float(logp[-n:].gather(-1, targets[:, None]).sum())


@pytest.fixture(scope="module")
def mc_items(stdlib_texts) -> list[dict]:
    """Contexts of many lengths (one beyond the model's context of 128 tokens), choices of
    different lengths; answers fixed in advance, not chosen to suit the model."""
    words = " ".join(stdlib_texts[5].split()).split(" ")
    items = []
    for i in range(16):
        length = 2 + i if i != 7 else 400  # item 7 must be cut from the left
        ctx = " ".join(words[i * 7 : i * 7 + length])
        choices = [words[200 + i], words[300 + i] + " " + words[301 + i], "return None", words[400 + i] + "()"]
        items.append({"context": ctx, "choices": choices, "answer": i % 4})
    return items


def test_accuracy_and_stderr_equal_an_independent_computation(cli, tmp_path, tiny_model_dir, mc_items):
    from lmforge.model.io import load_model_dir
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_model_dir)
    model, _ = load_model_dir(tiny_model_dir)
    model.eval()
    acc, acc_norm = [], []
    for item in mc_items:
        ctx = tok.encode(item["context"])
        lls = []
        for choice in item["choices"]:
            whole = tok.encode(item["context"] + " " + choice)
            lls.append(plain_loglikelihood(model, ctx, whole[len(ctx):]))
        pred = max(range(4), key=lambda k: (lls[k], -k))
        pred_norm = max(range(4), key=lambda k: (lls[k] / len(item["choices"][k]), -k))
        acc.append(float(pred == item["answer"]))
        acc_norm.append(float(pred_norm == item["answer"]))
    assert 0 < sum(acc) < len(acc)  # the test can tell right from wrong

    task = write_jsonl(tmp_path / "mine.jsonl", mc_items)
    r = cli("eval", "tasks", tiny_model_dir, "--tasks", task, "-o", tmp_path / "t.json", "--no-progress", "--log-items")
    assert r.code == 0, r.err
    res = json.loads((tmp_path / "t.json").read_text())
    t = res["tasks"]["mine"]
    n = len(mc_items)
    assert t["n"] == n and t["type"] == "multiple_choice"
    assert t["acc"] == sum(acc) / n and t["acc_norm"] == sum(acc_norm) / n
    assert t["acc_stderr"] == pytest.approx(statistics.stdev(acc) / math.sqrt(n), rel=1e-12)
    assert t["acc_norm_stderr"] == pytest.approx(statistics.stdev(acc_norm) / math.sqrt(n), rel=1e-12)
    assert t["truncated"] == 1 and any("cut from the left" in n for n in res["notes"])
    assert t["chance"] == 0.25 and res["average"] == t["acc"] and t["sha256"]
    assert len(res["details"]["items"]["mine"]) == n
    md = (tmp_path / "t.md").read_text()
    assert "mine" in md and f"{t['acc']:.4f} ± {t['acc_stderr']:.4f}" in md


def test_generative_exact_match_and_contains(tmp_path, tiny_model_dir):
    """Answers are set from a plain greedy loop (full forward per token, no KV cache): half the
    items expect what the model says, half something else."""
    import torch

    from lmforge.eval.tasks import TasksConfig, evaluate_tasks
    from lmforge.model.io import load_model_dir
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_model_dir)
    model, _ = load_model_dir(tiny_model_dir)
    model.eval()
    contexts = ["def add(a, b):", "import os", "The capital of France is", "x = [1, 2, 3]", "class Stack:", "for i in"]
    outputs = []
    for ctx in contexts:
        ids = tok.encode(ctx)
        new = []
        with torch.no_grad():
            for _ in range(6):
                logits, _ = model(torch.tensor([ids + new]))
                new.append(int(logits[0, -1].argmax()))
        outputs.append(tok.decode(new).split("\n")[0].strip())
    assert all(outputs)
    items = []
    for i, (ctx, out) in enumerate(zip(contexts, outputs)):
        answer = out if i % 2 == 0 else ["not what it says", out[:1] + "\u2603"]
        items.append({"context": ctx, "answer": answer})
    write_jsonl(tmp_path / "gen.jsonl", items)
    res = evaluate_tasks(str(tiny_model_dir), [str(tmp_path / "gen.jsonl")], TasksConfig(max_new_tokens=6, batch_size=4))
    t = res["tasks"]["gen"]
    assert t["type"] == "generate" and t["exact_match"] == 0.5 and t["contains"] == 0.5
    assert t["exact_match_stderr"] == pytest.approx(statistics.stdev([1, 0] * 3) / math.sqrt(6))


def test_builtin_tasks_ship_as_package_data_and_run(cli, tmp_path, tiny_model_dir):
    import tomllib
    from pathlib import Path

    from lmforge.eval.tasks import builtin_tasks, load_task

    names = builtin_tasks()
    assert {"arithmetic", "code", "facts", "arithmetic-gen", "capitals-gen"} <= set(names)
    for name, path in names.items():
        task = load_task(path, name)
        assert len(task.items) >= 20, name
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]
    assert "*.jsonl" in data["lmforge.eval.tasks_data"]

    r = cli("eval", "tasks", tiny_model_dir, "--tasks", "arithmetic,code", "--tasks", "capitals-gen", "--limit", 5,
            "-o", tmp_path / "b.json", "--no-progress")
    assert r.code == 0, r.err
    res = json.loads((tmp_path / "b.json").read_text())
    assert list(res["tasks"]) == ["arithmetic", "code", "capitals-gen"] and all(t["n"] == 5 for t in res["tasks"].values())
    assert (tmp_path / "b.png").stat().st_size > 0 and "arithmetic" in r.out


def test_bad_task_files(cli, tmp_path, tiny_model_dir):
    good = {"context": "2 + 2 =", "choices": ["4", "5"], "answer": 0}
    cases = {
        "range.jsonl": ([good, {"context": "1 + 1 =", "choices": ["2", "3", "4"], "answer": 3}], ":2: answer index 3 is out of range for 3 choices"),
        "neg.jsonl": ([{**good, "answer": -1}], ":1: answer index -1 is out of range"),
        "nochoice.jsonl": ([good, good, {"context": "x", "choices": ["only"], "answer": 0}], ":3: 'choices' must be a list of at least 2"),
        "noanswer.jsonl": ([{"context": "x", "choices": ["a", "b"]}], ":1: missing 'answer'"),
        "noctx.jsonl": ([{"prompt": "x", "choices": ["a", "b"], "answer": 0}], ":1: missing 'context'"),
        "str.jsonl": ([{**good, "answer": "7"}], ":1: answer '7' is not one of the choices"),
        "mixed.jsonl": ([good, {"context": "q", "answer": "a"}], ":2: a generate item in a multiple_choice task"),
    }
    for name, (items, message) in cases.items():
        path = write_jsonl(tmp_path / name, items)
        r = cli("eval", "tasks", tiny_model_dir, "--tasks", path, "--no-progress")
        assert r.code == 1 and f"{path}{message}" in r.err, (name, r.err)
        assert len(r.err.strip().splitlines()) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    r = cli("eval", "tasks", tiny_model_dir, "--tasks", empty)
    assert r.code == 1 and f"{empty}: empty file" in r.err
    r = cli("eval", "tasks", tiny_model_dir, "--tasks", "no-such-task")
    assert r.code == 1 and "unknown task 'no-such-task'" in r.err and "arithmetic" in r.err
    # A string answer naming a choice is accepted, as lm-eval accepts it.
    write_jsonl(tmp_path / "s.jsonl", [{**good, "answer": "5"}])
    r = cli("eval", "tasks", tiny_model_dir, "--tasks", tmp_path / "s.jsonl", "--no-progress")
    assert r.code == 0, r.err


def test_encode_pair_follows_lm_eval():
    """Trailing context spaces move to the continuation; an empty context becomes bos/eos."""
    from lmforge.eval.tasks import argmax, encode_pair, mean_stderr

    class Tok:  # one id per character: the split is easy to see
        bos_id, eos_id = None, 0

        def encode(self, s):
            return [ord(c) for c in s]

    ctx, cont = encode_pair(Tok(), "Answer: ", "yes")
    assert ctx == [ord(c) for c in "Answer:"] and cont == [ord(c) for c in " yes"]
    assert encode_pair(Tok(), "", " yes") == ([0], [ord(c) for c in " yes"])
    assert argmax([1.0, 3.0, 3.0]) == 1 and mean_stderr([1.0]) is None
