"""`lmforge recipe run chatbot` on a tiny model (the real one, SmolLM2, in the slow suite): the shipped
chat set, the stages, the report (template with the loss mask, checks, controls), continuing after
an interruption, the user's own data, and one-line errors for bad data. The tiny random model
fails every check; these tests hold the machinery, not the answers."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from conftest import interrupt_first_finetune, write_jsonl
from lmforge.errors import LmforgeError
from lmforge.recipes.chatbot import BUILTIN_DATA, ChatbotConfig, masked_text, matches, run_chatbot, show_template

# The slow test's short run of the real model (measured: see the README's chatbot recipe).
# Measured at 35 steps (the recipe's 15-minute budget on a loaded machine): held-out loss
# 2.043 -> 0.631, checks 4 -> 8 of 25, controls 6 -> 5 of 6.
SLOW_STEPS = 35
SLOW_LOSS_DROP = 0.8
SLOW_MORE_CHECKS = 2


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """One thread for the tiny model (see conftest.one_thread); the slow test's SmolLM2 keeps them all."""
    import torch

    threads = torch.get_num_threads()
    if not request.node.get_closest_marker("slow"):
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(tiny_model_dir, out, **kw) -> ChatbotConfig:
    base = dict(out=out, model=str(tiny_model_dir), max_steps=8, lr=1e-2, batch_size=4, block_size=128,
                max_new_tokens=6, progress=False)
    return ChatbotConfig(**{**base, **kw})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def user_turns(records: list[dict]) -> set[str]:
    return {m["content"] for r in records for m in r["messages"] if m["role"] == "user"}


def test_the_shipped_chat_set_is_what_its_script_writes_and_keeps_held_out_chats_apart(tmp_path):
    spec = importlib.util.spec_from_file_location("make_chatbot_data", BUILTIN_DATA / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    counts = module.write(tmp_path)
    for name in counts:
        assert (tmp_path / f"{name}.jsonl").read_text() == (BUILTIN_DATA / f"{name}.jsonl").read_text(), name
    train, val, heldout = (read(BUILTIN_DATA / f"{n}.jsonl") for n in ("train", "val", "heldout"))
    assert 60 <= len(train) <= 120 and len(val) >= 8 and len(heldout) >= 20
    # system prompts, multi-turn chats (answers after an earlier assistant turn) in training
    assert sum(r["messages"][0]["role"] == "system" for r in train) > len(train) // 3
    assert sum(sum(m["role"] == "assistant" for m in r["messages"]) >= 2 for r in train) >= 20
    # every held-out chat is a check; the question it asks is never a training or validation question
    seen = user_turns(train) | user_turns(val)
    kinds = {r["kind"] for r in heldout}
    assert kinds == {"fact", "follow-up", "system"}
    for r in heldout:
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user"
        assert r["messages"][-2]["content"] not in seen, r["id"]
        assert matches(r["messages"][-1]["content"], r["expect"]), r["id"]  # the reference reply passes its own check
    assert len({r["id"] for r in heldout}) == len(heldout)


def test_the_template_shows_the_assistant_only_loss_mask(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": [
        {"role": "system", "content": "You are Tess."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Who makes it?"},
        {"role": "assistant", "content": "Haldane Appliances."}]}])
    tpl = show_template(str(tiny_model_dir), {"train": str(train)})
    trained = "".join(s for m, s in tpl["spans"] if m)
    context = "".join(s for m, s in tpl["spans"] if not m)
    assert "Hello! How can I help?" in trained and "Haldane Appliances." in trained and "<|im_end|>" in trained
    assert "You are Tess." in context and "Who makes it?" in context and "<|im_start|>assistant" in context
    assert "Tess" not in trained and "Who makes" not in trained
    text = masked_text(tpl["spans"])
    assert text.replace("⟦", "").replace("⟧", "") == tpl["text"]
    assert re.search(r"⟦Hello! How can I help\?<\|im_end\|>", text)
    assert 0 < tpl["loss_tokens"] < tpl["tokens"]


def test_chatbot_recipe_end_to_end_and_continues_after_an_interruption(tiny_model_dir, tmp_path):
    out = tmp_path / "chatbot"
    messages = []
    r = run_chatbot(small(tiny_model_dir, out), echo=messages.append)
    n_checks = len(read(BUILTIN_DATA / "heldout.jsonl"))
    for which in ("before", "after"):
        assert len(r[which]["checks"]) == n_checks and len(r[which]["controls"]) == 6
        assert all(isinstance(c["pass"], bool) and isinstance(c["reply"], str) for c in r[which]["checks"])
        assert r[which]["checks_passed"] == sum(c["pass"] for c in r[which]["checks"])
    # trained on chats like the held-out ones at a high lr: the held-out loss on assistant tokens drops
    assert r["after"]["heldout"]["loss"] < r["before"]["heldout"]["loss"] - 0.05
    assert r["finetune"]["steps"] == 8 and r["finetune"]["start_val_loss"] > r["finetune"]["val_loss"]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "held-out loss" in report and f"{r['before']['heldout']['loss']:.4g}" in report
    assert "⟦" in report and "<|im_start|>" in report  # the rendered template with the loss mask
    for check in read(BUILTIN_DATA / "heldout.jsonl"):
        assert f"| {check['id']} |" in report  # every check, with its before/after reply
    assert "What is the capital of France?" in report
    assert f"lmforge chat {out / 'run'}" in report and f"lmforge serve {out / 'run'}" in report
    assert (out / "chatbot.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert saved["before"]["heldout"]["loss"] == r["before"]["heldout"]["loss"] and saved["finetune"]["steps"] == 8

    # an interruption after the fine-tune: the rerun reuses the finished stages
    (out / "stages" / "after.json").unlink()
    (out / "results.json").unlink()
    messages.clear()
    again = run_chatbot(small(tiny_model_dir, out), echo=messages.append)
    assert any("finetune: done before" in m for m in messages) and any("baseline: done before" in m for m in messages)
    assert again["after"]["heldout"] == r["after"]["heldout"]

    # other settings on the same folder are refused
    with pytest.raises(LmforgeError, match="continuing it needs the same ones"):
        run_chatbot(small(tiny_model_dir, out, lr=3e-3), echo=messages.append)


def test_an_interrupted_fine_tune_resumes_from_its_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """Killed mid-training (here: paused at step 4 of 8), the same command continues the run
    from its checkpoint instead of starting it again."""
    calls = interrupt_first_finetune(monkeypatch, at=4)
    cfg = small(tiny_model_dir, tmp_path / "chatbot")
    with pytest.raises(KeyboardInterrupt):
        run_chatbot(cfg, echo=lambda m: None)
    assert (tmp_path / "chatbot" / "run" / "latest").exists() and not (tmp_path / "chatbot" / "stages" / "finetune.json").exists()
    r = run_chatbot(cfg, echo=lambda m: None)
    assert calls == [False, True] and r["finetune"]["steps"] == 8


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is the code word number {i}?"},
                          {"role": "assistant", "content": f"The code word number {i} is amber-{i}."}]} for i in range(n)]


def test_the_users_chats_split_three_ways_with_their_own_checks(tiny_model_dir, tmp_path, cli):
    data = write_jsonl(tmp_path / "mine.jsonl", chats(20))
    checks = write_jsonl(tmp_path / "checks.jsonl", [
        {"messages": [{"role": "user", "content": "What is the code word number 3?"}], "expect": "amber-3", "id": "cw3"},
        {"messages": chats(1)[0]["messages"], "expect": "amber-0"}])
    out = tmp_path / "mine"
    res = cli("recipe", "run", "chatbot", "--model", tiny_model_dir, "--data", data, "--checks", checks, "-o", out,
              "--max-steps", 2)
    assert res.code == 0, res.err
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["counts"] == {"train": 16, "val": 2, "heldout": 2, "controls": 6, "checks": 2}
    assert read(out / "data" / "heldout.jsonl") == [chats(20)[9], chats(20)[19]]
    assert [c["id"] for c in results["after"]["checks"]] == ["cw3", "check-2"]
    assert results["before"]["heldout"]["chats"] == 2
    # without --checks: the held-out loss and the controls, no scripted checks
    res = cli("recipe", "run", "chatbot", "--model", tiny_model_dir, "--data", data, "-o", tmp_path / "nochecks",
              "--max-steps", 2)
    assert res.code == 0, res.err
    results = json.loads((tmp_path / "nochecks" / "results.json").read_text())
    assert results["after"]["checks"] == [] and len(results["after"]["controls"]) == 6
    assert "pass `--checks FILE`" in (tmp_path / "nochecks" / "report.md").read_text()


@pytest.mark.parametrize("content, why", [
    (None, "no such file"),
    ("not json at all\n", "mine.jsonl:1"),
    ('{"text": "plain text"}\n' * 12, "trains on chats"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n' * 12, "no assistant turn"),
    ('{"prompt": "hi", "completion": "ho"}\n' * 12, "unrecognised record"),
    (json.dumps(chats(3)[0]) + "\n", "needs at least 10"),
])
def test_bad_data_gives_a_one_line_error(tiny_model_dir, tmp_path, cli, content, why):
    data = tmp_path / "mine.jsonl"
    if content is not None:
        data.write_text(content, encoding="utf-8")
    res = cli("recipe", "run", "chatbot", "--model", tiny_model_dir, "--data", data, "-o", tmp_path / "out", "--max-steps", 2)
    assert res.code == 1 and why in res.err, res.err
    assert res.err.startswith("lmforge: error:") and res.err.count("\n") == 1 and "Traceback" not in res.err


def test_bad_checks_and_a_text_file_give_one_line_errors(tiny_model_dir, tmp_path, cli):
    data = write_jsonl(tmp_path / "mine.jsonl", chats(12))
    for record, why in (({"messages": [{"role": "user", "content": "hi"}], "expect": "(unclosed"}, "not a regex"),
                        ({"messages": [{"role": "user", "content": "hi"}]}, "needs 'messages'"),
                        ({"messages": [{"role": "robot", "content": "hi"}], "expect": "x"}, "unknown role")):
        checks = write_jsonl(tmp_path / "checks.jsonl", [record])
        res = cli("recipe", "run", "chatbot", "--model", tiny_model_dir, "--data", data, "--checks", checks,
                  "-o", tmp_path / "out", "--max-steps", 2, "--overwrite")
        assert res.code == 1 and why in res.err and res.err.count("\n") == 1, res.err
    text = tmp_path / "notes.txt"
    text.write_text("some text\n" * 50)
    res = cli("recipe", "run", "chatbot", "--data", text, "-o", tmp_path / "t")
    assert res.code == 1 and "not a text file" in res.err
    res = cli("recipe", "run", "style", "--checks", text, "-o", tmp_path / "s")
    assert res.code == 1 and "--checks is for the chatbot recipe" in res.err


def test_recipe_list_names_the_chatbot(cli):
    res = cli("recipe", "list")
    assert res.code == 0 and re.search(r"^chatbot\s+15 min", res.out, re.MULTILINE)


@pytest.fixture(scope="module")
def smollm2_home(tmp_path_factory):
    from conftest import lmforge_test_home

    yield from lmforge_test_home(tmp_path_factory)


@pytest.mark.slow
def test_the_real_recipe_teaches_smollm2_the_support_facts(smollm2_home, tmp_path):
    """SmolLM2-135M-Instruct, the built-in chat set, the recipe's settings for a fixed step count.
    It gave the measured run's figures exactly (2.043 -> 0.631, 4 -> 8, 6 -> 5) in 24.7 minutes on
    the 2 cores shared with other jobs (load 4-6); on an idle machine ~6-7 minutes (estimated from
    ~5 s a step, not measured)."""
    r = run_chatbot(ChatbotConfig(out=tmp_path / "chatbot", max_steps=SLOW_STEPS, progress=False))
    before, after = r["before"], r["after"]
    print(json.dumps({w: {"heldout": x["heldout"]["loss"], "checks": x["checks_passed"], "controls": x["controls_passed"],
                          "passed": [c["id"] for c in x["checks"] if c["pass"]]} for w, x in (("before", before), ("after", after))}))
    assert after["heldout"]["loss"] < before["heldout"]["loss"] - SLOW_LOSS_DROP
    assert after["checks_passed"] >= before["checks_passed"] + SLOW_MORE_CHECKS
    assert after["controls_passed"] >= len(after["controls"]) - 1  # general knowledge kept
