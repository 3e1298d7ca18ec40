from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests must not depend on how many cores the machine has or flood CI's two.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lmforge.cli import main  # noqa: E402
from lmforge.data.embedded import stdlib_files  # noqa: E402


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture(scope="module")
def one_thread():
    """For tests of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): threads
    gain nothing at these sizes, and on a busy 2-core machine OpenMP's threads wait on each
    other at every op (a 100x slowdown seen with another job running)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_seq2seq(config, seed: int = 0, head_scale: float = 1.0):
    """A Seq2Seq for `config` in eval mode, every weight perturbed (as random_model); head_scale
    multiplies the output head so that greedy and beam choices are not all near-ties."""
    import torch

    from lmforge.model.seq2seq import Seq2Seq

    torch.manual_seed(seed)
    model = Seq2Seq(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(head_scale)
    return model.eval()


def random_model(config, seed: int = 0):
    """A GPT for `config` in eval mode, every weight perturbed (norms start at 1, biases at 0:
    untouched, they would hide a mapping error in a conversion)."""
    import torch

    from lmforge.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture
def cli(capsys):
    """Run `lmforge ARGS` in-process; returns exit code, stdout, stderr."""

    def run(*args) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def stdlib_texts() -> list[str]:
    """Real text and code: a few hundred KB of the standard library, the same on every run."""
    files = [p for p in stdlib_files(include_tests=False) if p.stat().st_size > 2000][:60]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl_dir(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("part-*.jsonl")):
        out += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
    return out


def leftovers(parent: Path) -> list[str]:
    """Temp names an interrupted atomic write would leave behind."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]




@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, stdlib_texts):
    """A small random-weight Llama-style model dir with a ChatML byte-level BPE tokenizer."""
    import torch

    from lmforge.model.config import ModelConfig
    from lmforge.model.gpt import GPT
    from lmforge.model.io import save_model_dir
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    tok = train_tokenizer(stdlib_texts[:20], TokenizerTrainConfig(vocab_size=400), show_progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig(name="test-llama", vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4,
                            n_kv_head=2, n_embd=64, intermediate_size=128))
    return save_model_dir(model, tmp_path_factory.mktemp("models") / "llama", tokenizer=tok)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, stdlib_texts):
    import torch

    from lmforge.model.config import ModelConfig
    from lmforge.model.gpt import GPT
    from lmforge.model.io import save_model_dir
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    tok = train_tokenizer(stdlib_texts[:20], TokenizerTrainConfig(vocab_size=400), show_progress=False)
    torch.manual_seed(1)
    model = GPT(ModelConfig(name="test-gpt2", vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4,
                            n_kv_head=4, n_embd=64, intermediate_size=128, norm="layernorm", mlp="gelu",
                            position="learned", bias=True))
    return save_model_dir(model, tmp_path_factory.mktemp("models") / "gpt2", tokenizer=tok)


def lmforge_test_home(tmp_path_factory):
    """A generator for module fixtures: LMFORGE_HOME is a temp dir, or $LMFORGE_TEST_HOME to keep
    the registry's downloads and imports between test runs."""
    from lmforge.interop import registry

    mp = pytest.MonkeyPatch()
    mp.setenv("LMFORGE_HOME", os.environ.get("LMFORGE_TEST_HOME") or str(tmp_path_factory.mktemp("lmforge-home")))
    yield registry.cache_dir()
    mp.undo()


# A 2-layer model small enough for tests that train: the model file of the `shards` fixture.
SMALL = {"n_layer": 2, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "intermediate_size": 64, "block_size": 64,
         "dropout": 0.1}


@pytest.fixture(scope="session")
def shards(tmp_path_factory, stdlib_texts):
    """(shards dir, model YAML): 30 stdlib files packed with a 300-token BPE, and the SMALL model.
    Read-only: tests that train write their runs elsewhere."""
    import yaml

    from lmforge.data.pack import PackConfig, pack_corpus
    from lmforge.tokenizer import TokenizerTrainConfig, save_tokenizer_dir, train_tokenizer

    root = tmp_path_factory.mktemp("train")
    docs = stdlib_texts[:30]
    write_jsonl(root / "clean" / "part-00000.jsonl", [{"text": t} for t in docs])
    tok = train_tokenizer(docs, TokenizerTrainConfig(vocab_size=300), show_progress=False)
    save_tokenizer_dir(tok, root / "tok")
    pack_corpus([root / "clean"], root / "tok", root / "shards", PackConfig(val_fraction=0.1, workers=1), progress=False)
    model_file = root / "small.yaml"
    model_file.write_text(yaml.safe_dump({"preset": "tiny", **SMALL}))
    return root / "shards", model_file


def one_line_error(r, *fragments):
    """A CLI result that failed with exit 1 and one `lmforge: error:` line holding every fragment."""
    assert r.code == 1, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), r.err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def interrupt_first_finetune(monkeypatch, at: int) -> list:
    """Make the first `finetune` call of a recipe stop at step `at` and raise KeyboardInterrupt,
    as Ctrl-C right after that checkpoint would; later calls run as they are. Returns the
    `resume` argument of every call."""
    import lmforge.train.finetune as ft_module

    real, calls = ft_module.finetune, []

    def pausing(*args, **kw):
        calls.append(kw.get("resume"))
        if len(calls) == 1:
            real(*args, **{**kw, "pause_at": at})
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(ft_module, "finetune", pausing)
    return calls
