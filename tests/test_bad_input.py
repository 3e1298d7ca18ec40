"""Bad input gets one line: each case here was a traceback, a silent misreading or a silent
override before issue 13 (see each test's comment for what happened)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import leftovers, read_jsonl_dir, write_jsonl

from conftest import one_line_error
from lmforge.errors import LmforgeError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(stdlib_texts):
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    return train_tokenizer(stdlib_texts[:5], TokenizerTrainConfig(vocab_size=300), show_progress=False)


# -- the one JSONL reader ----------------------------------------------------------------------------
@pytest.mark.parametrize("line, cause", [
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid UTF-8 at byte"),  # was UnicodeDecodeError
    (b'{"text": "a"', "invalid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON (nested too deeply)"),  # was RecursionError
    (b'{"text": ' + b"9" * 5000 + b"}", "invalid JSON (Exceeds the limit"),  # was ValueError
    (b'{"text": "\\ud800"}', "lone UTF-16 surrogate"),  # was accepted, then a UnicodeEncodeError downstream
    (b'["text"]', "expected a JSON object, got array"),
])
def test_every_jsonl_reader_reports_file_and_line(tmp_path, tok, line, cause):
    from lmforge.data.sources import DocumentReader
    from lmforge.eval.bleu import read_pairs
    from lmforge.eval.perplexity import load_stream
    from lmforge.eval.tasks import load_task
    from lmforge.train.sft import load_examples

    f = tmp_path / "data.jsonl"
    f.write_bytes(b"\n" + line + b"\n")  # the blank first line counts: the error names line 2
    readers = {
        "clean": lambda: list(DocumentReader([f], encoding_errors="strict")),
        "sft": lambda: load_examples(f, tok, block_size=64),
        "tasks": lambda: load_task(f),
        "bleu pairs": lambda: read_pairs(f),
        "perplexity": lambda: load_stream(f, tok),
    }
    for name, read in readers.items():
        with pytest.raises(LmforgeError) as e:
            read()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{f}:2: ") and cause in msg, (name, msg)


def test_bleu_references_may_be_bare_lists_but_not_broken(tmp_path):
    from lmforge.eval.bleu import read_references

    good = tmp_path / "refs.jsonl"
    good.write_text('["a b", "c d"]\n"e f"\n{"reference": "g"}\n')
    assert read_references([good]) == [["a b", "c d"], ["e f"], ["g"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'["a"]\n["\xff"]\n')
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:2: invalid UTF-8 at byte 2"):
        read_references([bad])


def test_finetune_cli_names_the_line_with_invalid_utf8(cli, tiny_model_dir, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_bytes(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "caf\xe9"}]}\n')
    one_line_error(cli("finetune", tiny_model_dir, "--data", data, "-o", tmp_path / "run", "--no-progress"),
                   f"{data}:1: invalid UTF-8 at byte")


def test_skipped_file_contributes_nothing(cli, tmp_path, stdlib_texts):
    # Before: the documents read before the bad line of a.jsonl were kept, while stats.json said
    # the file was skipped.
    raw = tmp_path / "raw"
    write_jsonl(raw / "a.jsonl", [{"text": t} for t in stdlib_texts[:3]])
    with open(raw / "a.jsonl", "a") as f:
        f.write("{broken\n")
    write_jsonl(raw / "b.jsonl", [{"text": t} for t in stdlib_texts[3:5]])
    r = cli("clean", raw, "-o", tmp_path / "out", "--skip-bad-files", "--workers", "1", "--no-progress")
    assert r.code == 0, r.err
    kept = read_jsonl_dir(tmp_path / "out")
    assert {d["source"].split(":")[0] for d in kept} == {str(raw / "b.jsonl")}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert list(stats["input"]["skipped_files"]) == [str(raw / "a.jsonl")]
    assert "a.jsonl:4: invalid JSON" in stats["input"]["skipped_files"][str(raw / "a.jsonl")]
    assert stats["input"]["documents"] == 2 and stats["input"]["files"] == 1


# -- options ---------------------------------------------------------------------------------------
def test_clean_options_are_checked(cli, tmp_path, stdlib_texts):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in stdlib_texts[:3]])
    run = lambda *a: cli("clean", tmp_path / "docs.jsonl", "-o", tmp_path / "o", "--no-progress", "--workers", "1", *a)  # noqa: E731
    one_line_error(run("--near-num-perm", "1"), "--near-num-perm must be >= 2")  # was datasketch's ValueError
    # datasketch cannot cut 128 permutations into 2 LSH bands at 0.99: was a ValueError traceback.
    one_line_error(run("--near-threshold", "0.99"), "--near-num-perm 128 is too few for --near-threshold 0.99")
    one_line_error(run("--shard-mb", "0"), "--shard-mb must be a positive")  # was a new shard per document
    one_line_error(run("--workers", "-1"), "--workers must be >= 0")  # was one worker, silently
    one_line_error(run("--max-symbol-ratio", "2"), "--max-symbol-ratio must be between 0 and 1")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_pack_workers_must_not_be_negative(cli, tmp_path, stdlib_texts, tok):
    from lmforge.tokenizer import save_tokenizer_dir

    save_tokenizer_dir(tok, tmp_path / "tok")
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in stdlib_texts[:3]])
    # Before: -1 reached multiprocessing.Pool, a ValueError traceback.
    one_line_error(cli("pack", tmp_path / "docs.jsonl", "--tokenizer", tmp_path / "tok", "-o", tmp_path / "s",
                       "--workers", "-1", "--no-progress"), "--workers must be >= 0")


@pytest.mark.parametrize("field, value, what", [
    ("eps", -1.0, "a positive number"),  # was accepted: AdamW's own ValueError at the first step
    ("eps", 0.0, "a positive number"),
    ("lr", float("nan"), "a positive number"),
    ("min_lr", -1e-4, "a number >= 0"),
    ("weight_decay", float("inf"), "a number >= 0"),
    ("grad_clip", float("nan"), "a number >= 0"),  # NaN compared False with < 0: was accepted
    ("beta1", 1.0, "in [0, 1)"),
    ("beta2", -0.1, "in [0, 1)"),
    ("momentum", 1.5, "in [0, 1)"),
    ("time_budget", -1.0, "a number >= 0"),
    ("seed", -1, "an integer >= 0"),  # numpy's default_rng refuses negative seeds mid-run
    ("batch_size", 0, "an integer >= 1"),
    ("grad_accum", 0, "an integer >= 1"),
    ("max_steps", 0, "an integer >= 1"),
    ("warmup_steps", -1, "an integer >= 0"),
    ("eval_every", -1, "an integer >= 0"),
    ("checkpoint_every", -1, "an integer >= 0"),
    ("max_steps", "5", "an integer >= 1"),  # a string from a hand-edited YAML run config
])
def test_every_train_field_is_checked(field, value, what):
    from lmforge.train.config import FinetuneTrainConfig, TrainConfig

    flag = field.replace("_", "-")
    for cls in (TrainConfig, FinetuneTrainConfig):
        with pytest.raises(LmforgeError, match=rf"^--train\.{flag}/--{flag} must be {__import__('re').escape(what)}, got "):
            cls(**{field: value})


def test_train_flags_from_the_cli(cli, tmp_path):
    one_line_error(cli("pretrain", "--data", tmp_path, "-o", tmp_path / "r", "--eps", "-1"), "--train.eps/--eps must be a positive number, got -1.0")
    one_line_error(cli("pretrain", "--data", tmp_path, "-o", tmp_path / "r", "--train.momentum", "1"), "--train.momentum/--momentum must be in [0, 1)")
    # warmup beyond the run: the learning rate never reached --lr, silently
    one_line_error(cli("pretrain", "--data", tmp_path, "-o", tmp_path / "r", "--max-steps", "10", "--warmup-steps", "20"),
                   "--train.warmup-steps/--warmup-steps (20) exceeds --train.max-steps/--max-steps (10)")
    assert not (tmp_path / "r").exists()


def test_default_warmup_fits_the_run():
    """Unset, the warmup is 10% of the run, at most 100 steps: a short run needs no --warmup-steps,
    and a resumed run that extends --max-steps keeps the warmup it was recorded with."""
    import dataclasses

    from lmforge.train.config import FinetuneTrainConfig, TrainConfig

    assert [TrainConfig(max_steps=n).warmup_steps for n in (4, 50, 1000, 5000)] == [0, 5, 100, 100]
    TrainConfig(max_steps=4).check_schedule()
    assert dataclasses.replace(TrainConfig(max_steps=50), max_steps=4000).warmup_steps == 5
    assert FinetuneTrainConfig().warmup_steps == 5


def test_eval_count_options(cli, tmp_path):
    # Before: --max-tokens -5 cut the last 5 tokens off (ids[:-5]); --limit -1 was "all".
    one_line_error(cli("eval", "ppl", "nomodel", "--data", tmp_path, "--max-tokens", "-5"), "--max-tokens must be an integer >= 0, got -5")
    one_line_error(cli("eval", "tasks", "nomodel", "--tasks", "facts", "--limit", "-1"), "--limit must be an integer >= 0, got -1")
    one_line_error(cli("eval", "bleu", "--model", "m", "--data", tmp_path, "--max-new-tokens", "0"), "--max-new-tokens must be an integer >= 1")


# -- tokenizer -------------------------------------------------------------------------------------
def test_tokenizer_vocab_smaller_than_possible_is_said(cli, tmp_path, stdlib_texts):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in stdlib_texts[:3]])
    r = cli("tokenizer", "train", tmp_path / "docs.jsonl", "-o", tmp_path / "t", "--vocab-size", "10", "--no-progress")
    assert r.code == 0
    assert r.err.strip() == ("lmforge: warning: --vocab-size 10 is below the smallest bpe vocabulary for this corpus "
                             "(256 byte tokens + 4 special tokens): the tokenizer has 260 tokens")
    assert "with 260 tokens" in r.out


def test_char_tokenizer_without_vocab_size_takes_every_character(cli, tmp_path):
    # Before: the BPE default of 8192 applied, and a char corpus of 30 symbols failed against it.
    (tmp_path / "abc.txt").write_text("abcabc xyz xyz\n" * 5)
    r = cli("tokenizer", "train", tmp_path / "abc.txt", "-o", tmp_path / "t", "--kind", "char", "--no-progress")
    assert r.code == 0, r.err
    from lmforge.tokenizer import Tokenizer

    t = Tokenizer.load(tmp_path / "t")
    ordinary = set(t.hf.get_vocab(with_added_tokens=False)) - set(t.special_tokens())
    assert ordinary == set("abcxyz \n") and r.err == ""
    # An explicit size still wins, and is still refused when the corpus cannot give it.
    one_line_error(cli("tokenizer", "train", tmp_path / "abc.txt", "-o", tmp_path / "t2", "--kind", "char",
                       "--vocab-size", "50", "--no-progress"), "supports only 13 tokens", "less than --vocab-size 50")


# -- files written by lmforge, damaged -------------------------------------------------------------
@pytest.fixture
def shards_dir(tmp_path, stdlib_texts, tok):
    from lmforge.data.pack import PackConfig, pack_corpus
    from lmforge.tokenizer import save_tokenizer_dir

    save_tokenizer_dir(tok, tmp_path / "tok")
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in stdlib_texts[:20]])
    pack_corpus([tmp_path / "docs.jsonl"], tmp_path / "tok", tmp_path / "shards", PackConfig(val_fraction=0.1, workers=1),
                progress=False)
    return tmp_path / "shards"


@pytest.mark.parametrize("damage, fragment", [
    (lambda m: m.pop("splits"), "'splits' must be an object with a 'train' split"),  # was KeyError
    (lambda m: m.pop("dtype"), "'dtype' must be uint16 or uint32"),  # was KeyError
    (lambda m: m.update(dtype="float64"), "'dtype' must be uint16 or uint32"),  # was read as floats
    (lambda m: m["tokenizer"].pop("sha256"), "'tokenizer' must be an object"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../../etc/passwd"), "splits.train.shards[0]"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("tokens"), "splits.train.shards[0]"),
    (lambda m: m["splits"].update({"\n": None}), "splits['\\n'] must be an object"),  # found by the fuzz: two lines
])
def test_damaged_meta_json(cli, shards_dir, damage, fragment):
    meta_file = shards_dir / "meta.json"
    meta = json.loads(meta_file.read_text())
    damage(meta)
    meta_file.write_text(json.dumps(meta))
    one_line_error(cli("shards", shards_dir), f"{meta_file}: {fragment}")


def test_meta_json_not_utf8_or_not_an_object(cli, shards_dir):
    meta_file = shards_dir / "meta.json"
    meta_file.write_bytes(b'{"format": "\xff"}')  # was UnicodeDecodeError
    one_line_error(cli("shards", shards_dir), f"{meta_file}: invalid UTF-8 at byte 12")
    meta_file.write_text("[1, 2]")  # was AttributeError: 'list' object has no attribute 'get'
    one_line_error(cli("shards", shards_dir), f"{meta_file}: expected a JSON object, got array")


def test_tokenizer_config_not_an_object(cli, tmp_path, tok):
    from lmforge.tokenizer import save_tokenizer_dir

    save_tokenizer_dir(tok, tmp_path / "t")
    cfg = tmp_path / "t" / "tokenizer_config.json"
    cfg.write_text('"just a string"')  # was AttributeError on .get
    one_line_error(cli("tokenizer", "encode", tmp_path / "t", "hi"), f"{cfg}: expected a JSON object, got string")
    cfg.write_text('{"eos_token": ["<|endoftext|>"]}')  # was TypeError in token_to_id
    one_line_error(cli("tokenizer", "encode", tmp_path / "t", "hi"), f"{cfg}: eos_token must be a string")
    cfg.write_text('{"chat_template": 5}')
    one_line_error(cli("tokenizer", "encode", tmp_path / "t", "hi"), f"{cfg}: chat_template must be a string")
    cfg.write_text('{"chat_template": [{"name": "default", "template": "{{ messages }}"}]}')  # transformers' named templates
    from lmforge.tokenizer import Tokenizer

    assert Tokenizer.load(tmp_path / "t").chat_template == "{{ messages }}"


@pytest.fixture
def adapter_dir(tmp_path, tiny_model_dir):
    from lmforge.model.io import load_model_dir
    from lmforge.model.lora import LoRAConfig, apply_lora, save_adapter

    model, _ = load_model_dir(tiny_model_dir)
    cfg = LoRAConfig(rank=2)
    apply_lora(model, cfg)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_adapter(model, folder, cfg, str(tiny_model_dir))
    return folder


@pytest.mark.parametrize("damage, fragment", [
    (lambda m: m["lora"].pop("rank"), "LoRA setting 'rank' is missing"),  # was rank 16 silently, then a shape error
    (lambda m: m["lora"].update(rnak=2), "unknown LoRA setting 'rnak'"),  # was TypeError: unexpected keyword
    (lambda m: m.update(peft_type="LORA"), "unknown keys 'peft_type'"),
    (lambda m: m.pop("lora"), "missing 'lora'"),  # was KeyError
    (lambda m: m["lora"].update(rank="2"), "LoRA setting 'rank' has the wrong type (str)"),
    (lambda m: m["lora"].update(dropout=1.5), "--lora.dropout must be in [0, 1)"),
])
def test_damaged_adapter_config(cli, adapter_dir, tmp_path, damage, fragment):
    file = adapter_dir / "adapter_config.json"
    meta = json.loads(file.read_text())
    damage(meta)
    file.write_text(json.dumps(meta))
    one_line_error(cli("merge", adapter_dir, "-o", tmp_path / "merged"), f"{file}: ", fragment)


# -- Ctrl-C ----------------------------------------------------------------------------------------
def test_ctrl_c_in_a_terminal_exits_130_with_one_line(tmp_path):
    """Ctrl-C reaches the whole foreground process group: before, each pool worker printed its
    KeyboardInterrupt traceback and the command said "Aborted!" with exit 1."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = open("/work/shared/data/tinyshakespeare.txt", encoding="utf-8").read()
    # ~90 MB: on a quiet machine 12 copies were cleaned within the second this test waits, and the
    # SIGINT then landed in the interpreter's shutdown (signal handlers reset: killed, exit -2).
    for i in range(80):
        (corpus / f"d{i}.txt").write_text(f"{i}\n" + text)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "clean", str(corpus), "-o", str(out), "--workers", "2", "--no-progress",
         "--no-dedup-near"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,  # its own group, as a terminal job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while not leftovers(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    # Let the workers start (a Ctrl-C in the few ms the pool takes to start is ignored: see data/workers.py).
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "lmforge: interrupted"
    assert not out.exists() and leftovers(tmp_path) == []


def test_gguf_with_a_huge_array_length_is_refused_quickly(tmp_path):
    """Found by the fuzz suite: an array length from a damaged header made gguf's reader loop over
    empty reads past the end of the file, growing without end (11 GB in a minute)."""
    import gguf
    import numpy as np

    from lmforge.interop.gguf import open_gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("flags", [True, False, True])  # 1-byte items: reads past the end are empty, never misaligned
    w.add_tensor("token_embd.weight", np.ones((3, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    at = data.index(b"flags") + len("flags") + 8  # past the value type and the item type
    assert int.from_bytes(data[at : at + 8], "little") == 3
    data[at : at + 8] = (2**62).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    started = time.time()
    with pytest.raises(LmforgeError, match=r"m\.gguf: truncated or corrupt GGUF file \("):
        open_gguf(path)
    assert time.time() - started < 5


def test_tokenizer_json_without_model_type(cli, tmp_path, tok):
    """Found by the fuzz suite: tokenizers infers the model when "model.type" is missing, and
    lmforge's `kind` then raised KeyError('type')."""
    from lmforge.tokenizer import save_tokenizer_dir

    save_tokenizer_dir(tok, tmp_path / "t")
    file = tmp_path / "t" / "tokenizer.json"
    raw = json.loads(file.read_text())
    del raw["model"]["type"]
    file.write_text(json.dumps(raw))
    r = cli("tokenizer", "inspect", tmp_path / "t")
    assert r.code == 0, r.err
    assert r.out.startswith("kind: BPE ")


def test_yaml_and_text_inputs_get_one_line(cli, tmp_path, tok):
    """Invalid UTF-8 in a --config or --model YAML file, or in `tokenizer encode --file`, was a
    UnicodeDecodeError traceback; PyYAML's own errors spanned several lines."""
    from lmforge.tokenizer import save_tokenizer_dir

    bad_utf8 = tmp_path / "bad.yaml"
    bad_utf8.write_bytes(b"train: {lr: \xff}\n")
    one_line_error(cli("pretrain", "--config", bad_utf8, "-o", tmp_path / "r"), f"{bad_utf8}: invalid UTF-8 at byte 12")
    one_line_error(cli("estimate", "--model", bad_utf8), f"{bad_utf8}: invalid UTF-8 at byte 12")
    broken = tmp_path / "broken.yaml"
    broken.write_text("n_layer: [1, 2\nn_head: 3\n")
    one_line_error(cli("estimate", "--model", broken), f"{broken}: invalid YAML (", "at line 2 column")
    deep = tmp_path / "deep.yaml"
    deep.write_text("n_layer: " + "[" * 20_000 + "]" * 20_000 + "\n")
    one_line_error(cli("estimate", "--model", deep), f"{deep}: invalid YAML (nested too deeply)")
    odd = tmp_path / "odd.yaml"
    odd.write_text("preset: [tiny]\n")  # found by the fuzz suite: TypeError (unhashable list)
    one_line_error(cli("estimate", "--model", odd), "unknown model preset ['tiny']")
    huge = tmp_path / "huge.yaml"
    huge.write_text("n_layer: " + "7" * 5000 + "\n")  # found by the fuzz suite: ValueError from PyYAML
    one_line_error(cli("estimate", "--model", huge), f"{huge}: invalid YAML (Exceeds the limit (4300 digits)")
    save_tokenizer_dir(tok, tmp_path / "t")
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"caf\xe9")
    one_line_error(cli("tokenizer", "encode", tmp_path / "t", "--file", text), f"{text}: invalid UTF-8 at byte 3")


def test_a_key_with_a_newline_stays_on_one_line(cli, tmp_path):
    """Found by the fuzz suite: field names were joined raw into the message."""
    f = tmp_path / "odd.jsonl"
    f.write_text('{"bo\\ndy": "text"}\n')
    one_line_error(cli("clean", f, "-o", tmp_path / "o", "--no-progress", "--workers", "1"),
                   f"{f}:1: no field 'text' (fields: 'bo\\ndy')")
