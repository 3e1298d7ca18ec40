"""The pipeline API, chat rendering (the one function shared with fine-tuning), chat sessions,
and the `generate` / `chat` commands."""

import json
import subprocess
import sys

import pytest

import lmforge
from lmforge.chat import render_chat
from lmforge.errors import LmforgeError
from lmforge.generate.chat_session import ChatSession
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.interop.registry import load_model
from lmforge.tokenizer import Tokenizer

CONVO = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


def test_pipeline_shapes_like_transformers(tiny_model_dir):
    gen = lmforge.pipeline("text-generation", model=str(tiny_model_dir))
    out = gen("The world is a beautiful place,", max_new_tokens=10)
    assert isinstance(out, list) and len(out) == 1 and out[0]["generated_text"].startswith("The world is a beautiful place,")
    tail = gen("The world is a beautiful place,", max_new_tokens=10, return_full_text=False)[0]["generated_text"]
    assert out[0]["generated_text"] == "The world is a beautiful place," + tail  # greedy by default: deterministic
    many = gen(["a", "bb"], max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=1)
    assert [len(x) for x in many] == [3, 3]
    assert len({x["generated_text"] for x in many[1]}) > 1
    again = gen(["a", "bb"], max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=1)
    assert again == many
    with pytest.raises(LmforgeError, match="num_return_sequences > 1"):
        gen("a", num_return_sequences=2)
    with pytest.raises(LmforgeError, match="unknown generation arguments: num_beam"):
        gen("a", num_beam=4)


def test_pipeline_chat_messages(tiny_model_dir):
    gen = lmforge.pipeline("text-generation", model=str(tiny_model_dir))
    messages = [{"role": "user", "content": "Hi"}]
    out = gen(messages, max_new_tokens=6)[0]["generated_text"]
    assert out[:-1] == messages and out[-1]["role"] == "assistant" and isinstance(out[-1]["content"], str)


def test_pipeline_accepts_run_dirs_and_refuses_unknown_models(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(tiny_model_dir, run / "best")
    (run / "config.yaml").write_text("{}")
    assert lmforge.pipeline("text-generation", model=str(run)).loaded.path == run / "best"
    with pytest.raises(LmforgeError, match=r"gpt-17: no such path, and not a known model name \(known:"):
        lmforge.pipeline("text-generation", model="gpt-17")
    with pytest.raises(LmforgeError, match="unsupported task 'summarization'"):
        lmforge.pipeline("summarization", model=str(tiny_model_dir))


def test_generation_json_supplies_defaults(tiny_model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "generation.json").write_text(json.dumps({"max_new_tokens": 3, "do_sample": False}))
    gen = lmforge.pipeline("text-generation", model=str(d))
    assert gen.sampling_params().max_new_tokens == 3
    assert gen.sampling_params(max_new_tokens=7).max_new_tokens == 7


def test_render_chat_matches_transformers_and_masks_assistant_turns(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = Tokenizer.load(tiny_model_dir)
    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    r = render_chat(tok, CONVO)
    assert r.text == hf.apply_chat_template(CONVO, tokenize=False)
    expected = hf.apply_chat_template(CONVO, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert r.ids == list(expected)
    masked = tok.decode([i for i, m in zip(r.ids, r.loss_mask) if m])
    assert masked == "4<|im_end|>\n6, of course.<|im_end|>\n"
    prompt = render_chat(tok, CONVO[:2], add_generation_prompt=True)
    assert prompt.text.endswith("<|im_start|>assistant\n") and not any(prompt.loss_mask)


def test_bad_conversations(tiny_model_dir):
    tok = Tokenizer.load(tiny_model_dir)
    with pytest.raises(LmforgeError, match=r"messages\[0\]: unknown role 'bot'"):
        render_chat(tok, [{"role": "bot", "content": "x"}])
    with pytest.raises(LmforgeError, match="empty conversation"):
        render_chat(tok, [])
    no_template = Tokenizer(tok.hf, {k: v for k, v in tok.config.items() if k != "chat_template"})
    with pytest.raises(LmforgeError, match="no chat template"):
        render_chat(no_template, CONVO)


def test_chat_session_drops_oldest_turns_to_fit(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    notes = []
    session = ChatSession(Engine(loaded.model, loaded.tokenizer), SamplingParams(max_new_tokens=8, temperature=0.0),
                          system="Be brief.", notify=notes.append)
    for i in range(6):
        "".join(session.send(f"message number {i} " + "word " * 8))
    assert notes and "dropped" in notes[-1]
    assert session.messages()[0] == {"role": "system", "content": "Be brief."}
    assert session.history[-2]["content"].startswith("message number 5")
    with pytest.raises(LmforgeError, match="message too long"):
        "".join(session.send("long " * 300))
    assert session.history[-2]["content"].startswith("message number 5")  # the refused message is not kept


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], input=stdin, capture_output=True, text=True)


def test_chat_command_from_a_pipe(tiny_gpt2_dir, tmp_path):
    # The GPT-2-style test model: its greedy replies are words, where the Llama one's are blank
    # (and an empty reply is "in" any output).
    saved = tmp_path / "chat.json"
    r = run_cli("chat", tiny_gpt2_dir, "--max-new-tokens", "5", "--temperature", "0", "--system", "Be brief.",
                stdin=f"hello\n/reset\nhi again\n/save {saved}\n/exit\nnot sent\n")
    assert r.returncode == 0, r.stderr
    convo = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in convo] == ["system", "user", "assistant"] and convo[1]["content"] == "hi again"
    # The reply is the model's greedy answer to the conversation after /reset, and it was shown.
    want = lmforge.pipeline("text-generation", model=str(tiny_gpt2_dir))(convo[:2], max_new_tokens=5)[0]["generated_text"]
    assert convo[2]["content"].strip() and convo[2]["content"] == want[-1]["content"].strip()
    assert convo[2]["content"] in r.stdout
    assert "[history cleared]" in r.stderr


def test_generate_command(tiny_model_dir):
    r = run_cli("generate", tiny_model_dir, "def f(x):", "--max-new-tokens", "8", "--temperature", "0", "--no-stream")
    assert r.returncode == 0, r.stderr
    # The command prints the completion alone: the library's greedy continuation, not just anything.
    want = lmforge.pipeline("text-generation", model=str(tiny_model_dir))("def f(x):", max_new_tokens=8, return_full_text=False)
    assert want[0]["generated_text"].strip() and r.stdout == want[0]["generated_text"] + "\n"
    again = run_cli("generate", tiny_model_dir, "def f(x):", "--max-new-tokens", "8", "--temperature", "0", "--stream")
    assert again.stdout == r.stdout
    for args, msg in ((["--top-p", "1.5"], "top_p must be in"), (["--temperature", "-1"], "temperature must be >= 0"),
                      (["--max-new-tokens", "0"], "max_new_tokens must be positive")):
        bad = run_cli("generate", tiny_model_dir, "x", *args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 1 and len(lines) == 1 and lines[0].startswith("lmforge: error: "), bad.stderr
        assert msg in lines[0]
    assert "empty prompt" in run_cli("generate", tiny_model_dir, "").stderr
    assert "nope: no such path, and not a known model name" in run_cli("generate", "nope", "x").stderr
    long = run_cli("generate", tiny_model_dir, "word " * 300, "--max-new-tokens", "4", "--truncate", "left", "--temperature", "0")
    assert long.returncode == 0 and "prompt cut from" in long.stderr
