"""Portability: the free-memory probe works where there is no /proc (macOS, Windows), so
pretraining and fine-tuning run there; the declared floors and the LICENSE match what is used."""

from __future__ import annotations

import builtins
import platform
import re
import tomllib
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from test_train import small_cfg

from lmforge.errors import LmforgeError
from lmforge.train.pretrain import pretrain

ROOT = Path(__file__).parents[1]
FAKE_FREE = 6 << 30


@pytest.fixture(params=["Darwin", "Windows"])
def other_os(request, monkeypatch):
    """No /proc to read (opening it fails as it would there) and psutil answering as that OS."""
    import psutil

    real_open = builtins.open

    def open_without_proc(file, *args, **kwargs):
        if str(file).startswith("/proc/"):
            raise FileNotFoundError(2, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    memory = namedtuple("svmem", "total available percent used free")
    monkeypatch.setattr(builtins, "open", open_without_proc)
    monkeypatch.setattr(platform, "system", lambda: request.param)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(16 << 30, FAKE_FREE, 62.5, 10 << 30, 1 << 30))
    return request.param


def test_available_memory_comes_from_a_portable_probe(other_os):
    from lmforge.runtime import available_memory_bytes

    assert available_memory_bytes(torch.device("cpu")) == FAKE_FREE


def test_pretrain_runs_and_checks_memory_without_proc(other_os, shards, tmp_path, one_thread):  # noqa: F811
    data, model_file = shards
    summary = pretrain(data, str(model_file), tmp_path / "r", small_cfg(max_steps=2, eval_every=2, checkpoint_every=2),
                       progress=False, sample_tokens=4)
    assert summary["steps"] == 2
    with pytest.raises(LmforgeError, match=r"but cpu has 6.0 GB free; lower --batch-size"):
        pretrain(data, str(model_file), tmp_path / "big", small_cfg(batch_size=1 << 16, block_size=64), progress=False)


def test_finetune_memory_checks_without_proc(other_os, tiny_model_dir):
    from lmforge.interop.registry import load_model
    from lmforge.train.config import TrainConfig
    from lmforge.train.finetune import _check_memory

    model = load_model(tiny_model_dir).model
    n = model.param_count()
    assert _check_memory(model, TrainConfig(batch_size=2), 32, n, n, torch.device("cpu"))["estimated_bytes"] > 0
    with pytest.raises(LmforgeError, match=r"but cpu has 6.0 GB free"):
        _check_memory(model, TrainConfig(batch_size=1 << 17), 128, n, n, torch.device("cpu"))


# -- what pyproject declares -------------------------------------------------------------------
def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floor(requirement: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.search(r">=\s*([\d.]+)", requirement).group(1).split("."))


def test_declared_floors_hold():
    project = _pyproject()["project"]
    # tomllib (these tests, Python 3.11+) sets the Python floor.
    assert _floor(project["requires-python"]) >= (3, 11)
    torch_req = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    # Fused AdamW on CPU tensors (lmforge/train/optim.py) arrived in torch 2.4.
    assert _floor(torch_req) >= (2, 4)
    assert any(re.match(r"psutil\b", d) for d in project["dependencies"])


def test_the_declared_license_file_is_there():
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
