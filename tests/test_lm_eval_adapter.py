"""The lm-evaluation-harness adapter: lm-eval's own evaluator, on a local YAML task with local
JSONL data (offline), gives the same accuracy as `lmforge eval tasks` on the same items; the
rolling log-likelihood and generate_until agree with plain computations."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl

pytest.importorskip("lm_eval")


pytestmark = pytest.mark.usefixtures("one_thread")

TASK_YAML = """\
task: lmforge_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def items(stdlib_texts) -> list[dict]:
    words = " ".join(" ".join(stdlib_texts[8:12]).split()).split(" ")
    out = []
    for i in range(30):
        ctx = " ".join(words[i * 5 : i * 5 + 3 + i % 9]) + (" " if i % 5 == 0 else "")  # some trailing spaces
        choices = [words[500 + i], words[600 + i] + " " + words[601 + i], "True", words[700 + i] + "."]
        out.append({"context": ctx, "choices": choices, "answer": (i * 7) % 4})
    return out


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory, tiny_model_dir, items):
    import os

    d = tmp_path_factory.mktemp("lm_eval")
    data = write_jsonl(d / "data" / "items.jsonl", items)
    (d / "tasks").mkdir()
    (d / "tasks" / "lmforge_local.yaml").write_text(TASK_YAML.format(data=json.dumps(str(data))), encoding="utf-8")
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(d / "hf-cache"))
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        import lmforge.eval.lm_eval_adapter  # noqa: F401  registers the "lmforge" model type

        manager = TaskManager(include_path=str(d / "tasks"), include_defaults=False)
        out = lm_eval.simple_evaluate(model="lmforge", model_args={"pretrained": str(tiny_model_dir)},
                                      tasks=["lmforge_local"], task_manager=manager, log_samples=True,
                                      bootstrap_iters=1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return d, out


def test_lm_eval_accuracy_equals_lmforge_eval_tasks(cli, tiny_model_dir, lm_eval_run):
    d, out = lm_eval_run
    theirs = out["results"]["lmforge_local"]
    r = cli("eval", "tasks", tiny_model_dir, "--tasks", d / "data" / "items.jsonl", "-o", d / "ours.json",
            "--no-progress", "--log-items")
    assert r.code == 0, r.err
    ours = json.loads((d / "ours.json").read_text())["tasks"]["items"]
    assert ours["n"] == 30
    assert ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"]
    assert ours["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], rel=1e-9)
    assert ours["acc_norm_stderr"] == pytest.approx(theirs["acc_norm_stderr,none"], rel=1e-9)
    assert 0 < ours["acc"] < 1  # not a degenerate agreement
    # Item by item, the same log-likelihoods (lm-eval orders its samples by doc id).
    samples = sorted(out["samples"]["lmforge_local"], key=lambda s: s["doc_id"])
    logged = json.loads((d / "ours.json").read_text())["details"]["items"]["items"]
    for s, mine in zip(samples, logged):
        lls = [float(resp[0][0]) for resp in s["resps"]]
        assert lls == pytest.approx(mine["loglikelihoods"], rel=1e-5, abs=1e-5)


def test_rolling_loglikelihood_and_generate_until(tiny_model_dir):
    import torch
    from lm_eval.api.instance import Instance

    from lmforge.eval.lm_eval_adapter import LmforgeLM
    from lmforge.generate.sampling import SamplingParams

    lm = LmforgeLM(pretrained=str(tiny_model_dir))
    tok, model = lm.lm_tokenizer, lm.engine.model
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 6
    ids = tok.encode(text)
    assert len(ids) > 2 * lm.max_length  # several windows
    # lm-eval's definition by hand: disjoint windows of max_length predictions, the first
    # conditioned on the prefix token, each later one on the max_length tokens before it.
    expected, block, done = 0.0, lm.max_length, 0
    stream = [lm.prefix_token_id] + ids
    with torch.no_grad():
        while done < len(ids):
            end = min(done + block, len(ids))
            inp = stream[max(0, end - block) : end]  # stream[k] predicts ids[k]
            logits, _ = model(torch.tensor([inp]))
            logp = torch.log_softmax(logits[0].double(), -1)
            n = end - done
            expected += float(logp[-n:].gather(-1, torch.tensor(ids[done:end])[:, None]).sum())
            done = end
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got[0] == pytest.approx(expected, rel=1e-5)

    reqs = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 8}), i)
            for i, p in enumerate(["def add(a, b):", "class Stack:", "import"])]
    texts = lm.generate_until(reqs)
    for req, text_out in zip(reqs, texts):
        alone = lm.engine.generate([req.args[0]], SamplingParams(max_new_tokens=8, temperature=0.0, stop=["\n"]))[0]
        assert text_out == alone.text and "\n" not in text_out
