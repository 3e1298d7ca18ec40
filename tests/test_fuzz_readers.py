"""Property-based fuzzing of every reader of a user's file (JSONL for clean, fine-tuning, tasks
and BLEU; meta.json, config.json, generation.json, tokenizer.json, tokenizer_config.json,
adapter_config.json, eval result JSON, a model settings YAML; the safetensors and GGUF headers): whatever the bytes,
reading either succeeds or raises a one-line LmforgeError; any other exception (a traceback for
the user) fails, and so does an example slower than the deadline (a hang).

Inputs start from a valid file of each kind and are damaged two ways: structurally (a value
replaced by any JSON value, a key dropped or added, deep nesting, huge numbers, lone surrogates)
and byte-wise (truncated, bytes flipped or inserted, invalid UTF-8). The default run tries a few
hundred inputs in all (about 20 s); `-m slow` runs 20 times as many, not derandomized. Counts per
reader are printed at the end of the module's run.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lmforge.errors import LmforgeError

pytestmark = pytest.mark.usefixtures("one_thread")

TRIED: Counter[str] = Counter()
DEADLINE_MS = 5000  # generous: the machine is shared; a hang is unbounded, not 5 s
THOROUGH = 20  # the slow variant's multiple of each reader's default examples


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    if TRIED:
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        line = "fuzz examples tried: " + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items())) + f"; total {sum(TRIED.values())}"
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():  # shown without -s too
                reporter.write_line("\n" + line)


# -- strategies ------------------------------------------------------------------------------------
_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=12))
json_values = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)


def _containers(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path] if isinstance(obj, (dict, list)) else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out += _containers(v, path + (k,))
    return out


def _at(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


@st.composite
def json_variant(draw, base: Any, keys: tuple[str, ...] = ()) -> Any:
    """`base` with one to three structural edits at random places."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        spots = _containers(obj)
        if not spots:
            return draw(json_values)
        node = _at(obj, draw(st.sampled_from(spots)))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if isinstance(node, dict):
            if op == "add" or not node:
                node[draw(st.sampled_from(keys) | st.text(max_size=6) if keys else st.text(max_size=6))] = draw(json_values)
            else:
                key = draw(st.sampled_from(sorted(node)))
                if op == "delete":
                    del node[key]
                else:
                    node[key] = draw(json_values)
        else:
            if op == "add" or not node:
                node.append(draw(json_values))
            else:
                i = draw(st.integers(0, len(node) - 1))
                if op == "delete":
                    del node[i]
                else:
                    node[i] = draw(json_values)
    return obj


@st.composite
def damaged_bytes(draw, data: bytes, focus: int | None = None) -> bytes:
    """`data` truncated, with bytes flipped, inserted or deleted (`focus`: mostly within the first N bytes)."""
    buf = bytearray(data)
    limit = min(len(buf), focus) if focus else len(buf)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, limit - 1))) if buf else 0
        if op == "truncate":
            del buf[pos:]
        elif op == "flip" and pos < len(buf):
            buf[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]))
        elif op == "delete":
            del buf[pos : pos + draw(st.integers(1, 16))]
    return bytes(buf)


def _dumps(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def json_document(draw, base: Any, keys: tuple[str, ...] = ()) -> bytes:
    """One JSON document: valid, structurally varied, byte-damaged, or a parser trap."""
    kind = draw(st.sampled_from(["variant", "variant", "damaged", "trap", "bytes"]))
    if kind == "trap":
        return draw(st.sampled_from([b"[" * 50_000 + b"]" * 50_000, b'{"a": ' + b"7" * 5000 + b"}", b'"\\udc00"',
                                     b'{"a": "\\ud800"}', b"", b"null", b"\xef\xbb\xbf{}", b"NaN"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    doc = _dumps(draw(json_variant(base, keys)) if kind == "variant" else base, draw(st.booleans()))
    return draw(damaged_bytes(doc)) if kind == "damaged" else doc


@st.composite
def jsonl_document(draw, bases: list[Any], keys: tuple[str, ...] = ()) -> bytes:
    """Several JSONL lines, each from one of `bases`: most valid, some varied or damaged."""
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        base = draw(st.sampled_from(bases))
        line = draw(st.sampled_from(["valid", "valid", "variant", "doc"]))
        if line == "valid":
            lines.append(_dumps(base, True))
        elif line == "variant":
            lines.append(_dumps(draw(json_variant(base, keys)), draw(st.booleans())))
        else:
            lines.append(draw(json_document(base, keys)).replace(b"\n", b" "))
        if draw(st.booleans()):
            lines.append(b"")
    return b"\n".join(lines) + draw(st.sampled_from([b"\n", b"", b"\r\n"]))


# -- the readers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="lmforge-fuzz-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def tok(stdlib_texts):
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    return train_tokenizer(stdlib_texts[:3], TokenizerTrainConfig(vocab_size=280), show_progress=False)


def _jsonl_readers(workdir: Path, tok) -> dict[str, tuple[Any, Callable[[bytes], Any]]]:
    from lmforge.data.sources import DocumentReader
    from lmforge.eval.bleu import read_pairs, read_references
    from lmforge.eval.tasks import load_task
    from lmforge.train.sft import load_examples

    f = workdir / "data.jsonl"

    def with_file(read: Callable[[Path], Any]) -> Callable[[bytes], Any]:
        def run(data: bytes) -> Any:
            f.write_bytes(data)
            return read(f)
        return run

    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello there"}]}
    sft = [chat, {"instruction": "add", "input": "2 2", "output": "4"},
           {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, {"text": "plain text"}]
    sft_keys = ("messages", "conversations", "instruction", "input", "output", "text", "role", "content", "from", "value")
    tasks = [{"context": "2+2=", "choices": ["4", "5"], "answer": 0}, {"context": "Paris is in", "choices": ["France", "Peru"], "answer": "France"},
             {"context": "1+1=", "answer": ["2", "two"]}]
    return {
        "clean jsonl": (jsonl_document([{"text": "some text", "source": "x"}], ("text",)),
                        with_file(lambda p: list(DocumentReader([p], encoding_errors="strict")))),
        "clean jsonl (replace)": (jsonl_document([{"text": "some text"}], ("text",)), with_file(lambda p: list(DocumentReader([p])))),
        "sft jsonl": (jsonl_document(sft, sft_keys), with_file(lambda p: load_examples(p, tok, block_size=48))),
        "tasks jsonl": (jsonl_document(tasks, ("context", "choices", "answer")), with_file(load_task)),
        "bleu refs jsonl": (jsonl_document([["a b", "c d"], {"references": ["x"]}, {"reference": "y"}, "z"], ("references", "reference")),
                            with_file(lambda p: read_references([p]))),
        "bleu pairs jsonl": (jsonl_document([{"source": "s", "reference": "r"}, {"source": "s", "references": ["r", "q"]}],
                                            ("source", "reference", "references")), with_file(read_pairs)),
    }


def _file_readers(workdir: Path, tok) -> dict[str, tuple[Any, Callable[[bytes], Any]]]:
    from safetensors.numpy import save as save_safetensors

    from lmforge.data.loader import TokenShards
    from lmforge.eval.results import load_result
    from lmforge.interop.bundle import read_generation
    from lmforge.interop.gguf import open_gguf
    from lmforge.model.config import ModelConfig
    from lmforge.model.io import read_model_config, read_safetensors
    from lmforge.model.lora import LoRAConfig, read_adapter_config
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.pretrain import resolve_model_config

    # shards dir: two real shard files; meta.json is what varies
    shards = workdir / "shards"
    shards.mkdir()
    np.arange(100, dtype=np.uint16).tofile(shards / "train-00000.bin")
    np.arange(50, dtype=np.uint16).tofile(shards / "val-00000.bin")
    meta = {"format": "lmforge-token-shards", "version": 1, "dtype": "uint16", "vocab_size": 300, "eos_id": 0,
            "tokenizer": {"sha256": "ab" * 32, "source": "t", "kind": "BPE"}, "documents": 3,
            "splits": {"train": {"tokens": 100, "documents": 2, "shards": [{"file": "train-00000.bin", "tokens": 100}]},
                       "val": {"tokens": 50, "documents": 1, "shards": [{"file": "val-00000.bin", "tokens": 50}]}}}

    def read_shards(data: bytes):
        (shards / "meta.json").write_bytes(data)
        ts = TokenShards(shards)
        _ = ts.vocab_size, ts.tokenizer_sha256
        return [ts.split(name).tokens for name in ts.meta["splits"]]

    model = workdir / "model"
    model.mkdir()

    def read_config(data: bytes):
        (model / "config.json").write_bytes(data)
        return read_model_config(model)

    tokdir = workdir / "tok"
    tok.save(tokdir)
    tok_json = json.loads(tok.hf.to_str())

    def read_tokenizer(data: bytes):
        (tokdir / "tokenizer.json").write_bytes(data)
        t = Tokenizer.load(tokdir)
        return t.kind, t.bos_id, t.eos_id, t.chat_template

    def read_tokenizer_config(data: bytes):
        (tokdir / "tokenizer.json").write_text(tok.hf.to_str())
        (tokdir / "tokenizer_config.json").write_bytes(data)
        t = Tokenizer.load(tokdir)
        return t.bos_id, t.eos_id, t.pad_id, t.chat_template

    adapter = workdir / "adapter"
    adapter.mkdir()

    def read_adapter(data: bytes):
        (adapter / "adapter_config.json").write_bytes(data)
        meta = read_adapter_config(adapter)
        return LoRAConfig(**meta["lora"])

    st_file = workdir / "model.safetensors"
    st_base = save_safetensors({"tok_emb.weight": np.ones((4, 3), np.float32), "b": np.arange(5, dtype=np.int64)})
    header_len = int.from_bytes(st_base[:8], "little")
    st_header = json.loads(st_base[8 : 8 + header_len])

    @st.composite
    def safetensors_bytes(draw) -> bytes:
        if draw(st.booleans()):
            return draw(damaged_bytes(st_base, focus=8 + header_len))
        header = _dumps(draw(json_variant(st_header, ("dtype", "shape", "data_offsets", "__metadata__"))), True)
        length = len(header) if draw(st.integers(0, 3)) else draw(st.integers(0, 2**64 - 1))
        return length.to_bytes(8, "little") + header + st_base[8 + header_len :]

    def read_st(data: bytes):
        st_file.write_bytes(data)
        return read_safetensors(st_file)

    def read_generation_json(data: bytes):
        (model / "generation.json").write_bytes(data)
        return read_generation(model)

    result_file = workdir / "result.json"

    def read_result(data: bytes):
        result_file.write_bytes(data)
        return load_result(result_file)

    result = {"format": "lmforge-eval", "kind": "ppl", "metrics": {"perplexity": 12.5}, "model": {"name": "m"},
              "data": {"path": "d", "sha256": "00"}, "settings": {}, "notes": []}

    model_yaml = workdir / "model.yaml"

    def read_model_yaml(data: bytes):
        model_yaml.write_bytes(data)
        return resolve_model_config(str(model_yaml), {})

    @st.composite
    def yaml_bytes(draw) -> bytes:
        """JSON is YAML; plus YAML's own syntax, damaged."""
        if draw(st.booleans()):
            return draw(json_document({"preset": "tiny", "n_layer": 2, "model": {"n_head": 2}}, ("preset", "model", "n_layer")))
        return draw(damaged_bytes(b"preset: tiny\nn_layer: 2\nn_embd: 64\nnorm: rmsnorm  # a comment\ntags: [a, b]\n"))

    gguf_file = workdir / "model.gguf"
    gguf_base = _small_gguf(workdir / "base.gguf")

    def read_gguf_header(data: bytes):
        gguf_file.write_bytes(data)
        return open_gguf(gguf_file)

    config = {"lmforge_model": ModelConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=2, intermediate_size=64).to_dict(),
              "format_version": 1}
    return {
        "meta.json": (json_document(meta, ("format", "version", "dtype", "splits", "shards", "file", "tokens", "tokenizer")), read_shards),
        "config.json": (json_document(config, tuple(config["lmforge_model"])), read_config),
        "tokenizer.json": (json_document(tok_json, ("model", "type", "vocab", "merges", "added_tokens", "pre_tokenizer", "decoder")),
                           read_tokenizer),
        "tokenizer_config.json": (json_document(tok.config, ("bos_token", "eos_token", "pad_token", "chat_template", "content")),
                                  read_tokenizer_config),
        "adapter_config.json": (json_document({"lora": asdict(LoRAConfig()), "base_model": "m", "targets": ["blocks.0.attn.qkv"]},
                                              ("lora", "base_model", "targets", "rank", "alpha")), read_adapter),
        "safetensors header": (safetensors_bytes(), read_st),
        "gguf header": (damaged_bytes(gguf_base, focus=400), read_gguf_header),
        "generation.json": (json_document({"stop_token_ids": [0, 2], "temperature": 0.7}, ("stop_token_ids",)), read_generation_json),
        "eval result json": (json_document(result, ("format", "kind", "metrics")), read_result),
        "model yaml": (yaml_bytes(), read_model_yaml),
    }


def _small_gguf(path: Path) -> bytes:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fuzz base")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_uint32("llama.attention.head_count", 2)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_token_list(["a", "b", "c"])
    w.add_array("tokenizer.ggml.scores", [0.0, 1.0, 2.0])
    w.add_tensor("token_embd.weight", np.ones((3, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


# Default examples per reader: the whole module stays near 20 s on a busy 2-core machine.
EXAMPLES = {"clean jsonl": 50, "clean jsonl (replace)": 30, "sft jsonl": 50, "tasks jsonl": 50, "bleu refs jsonl": 50,
            "bleu pairs jsonl": 50, "meta.json": 50, "config.json": 50, "tokenizer.json": 40, "tokenizer_config.json": 50,
            "adapter_config.json": 50, "safetensors header": 50, "gguf header": 50, "generation.json": 40,
            "eval result json": 40, "model yaml": 40}


@pytest.fixture(scope="module")
def readers(workdir, tok):
    return {**_jsonl_readers(workdir, tok), **_file_readers(workdir, tok)}


def _fuzz(readers, name: str, examples: int, derandomize: bool) -> None:
    strategy, read = readers[name]

    @settings(max_examples=examples, deadline=DEADLINE_MS, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(data: bytes) -> None:
        TRIED[name] += 1
        try:
            read(data)
        except LmforgeError as e:
            msg = str(e)
            assert msg and "\n" not in msg, f"{name}: a multi-line message: {msg!r}"

    check()


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_reader_fuzz(readers, name):
    _fuzz(readers, name, EXAMPLES[name], derandomize=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_reader_fuzz_thorough(readers, name):
    _fuzz(readers, name, EXAMPLES[name] * THOROUGH, derandomize=False)


def test_the_fuzz_sees_every_reader(readers):
    """A reader added to the table without examples (or the reverse) would go unfuzzed."""
    assert set(readers) == set(EXAMPLES)
    assert os.path.basename(__file__) == "test_fuzz_readers.py"
