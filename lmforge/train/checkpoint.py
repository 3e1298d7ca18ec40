"""Resumable checkpoints: model files + optimizer + trainer state, verified by a manifest.

A checkpoint is `RUN/checkpoints/step-NNNNNN/`, written into a temp folder, fsynced and renamed;
`manifest.json` (the size and SHA-256 of every file) is written last inside it, and `RUN/latest`
(a one-line text file naming the folder) is updated only after the rename. Optimizer tensors go
to safetensors and everything else to JSON: nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_dir, write_text_atomic
from lmforge.manifest import previous_good_hint, verify_manifest, write_manifest

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda_{i}"] = s
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def verify_checkpoint(folder: Path) -> None:
    """Refuse a checkpoint whose files are missing, truncated or altered (its manifest is required:
    a checkpoint without one was never completed)."""
    if not folder.is_dir():
        raise LmforgeError(f"{folder}: no such checkpoint folder")
    verify_manifest(folder, required=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    write_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint `step`, point `latest` at it, and delete all but the newest `keep_last`."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    folder = root / checkpoint_name(step)
    with atomic_dir(folder, overwrite=True) as tmp:
        write_model(tmp)
        tensors, meta = optimizer_to_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        save_file(rng_state(), str(tmp / RNG_FILE))
        write_text_atomic(tmp / STATE_FILE, json.dumps({**state, "step": step, "optimizer": meta}, indent=1))
        write_manifest(tmp)
    write_text_atomic(run_dir / LATEST, folder.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        # Renamed first: a kill mid-delete leaves a `.del-` leftover (removed on the next start), never
        # a half-deleted `step-*` folder that looks like a checkpoint.
        doomed = old.with_name(f".{old.name}.del-{os.getpid()}")
        os.replace(old, doomed)
        shutil.rmtree(doomed)
    return folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint `latest` names, verified; a corrupt one is refused, naming the previous good one."""
    pointer = run_dir / LATEST
    if not pointer.exists():
        raise LmforgeError(f"{run_dir}: nothing to resume (no {LATEST} checkpoint pointer)")
    folder = run_dir / CHECKPOINTS / pointer.read_text().strip()
    try:
        verify_checkpoint(folder)
    except LmforgeError as e:
        raise LmforgeError(f"{e}{previous_good_hint(folder)}") from None
    return folder


def load_checkpoint_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer and RNG state from a verified checkpoint; return the trainer state."""
    verify_checkpoint(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    optimizer_from_tensors(optimizer, load_file(str(folder / OPTIMIZER_FILE)), state.pop("optimizer"))
    set_rng_state(load_file(str(folder / RNG_FILE)))
    return state
