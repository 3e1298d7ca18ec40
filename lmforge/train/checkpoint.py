"""Resumable checkpoints: model files + optimizer + trainer state, verified by a manifest.

A checkpoint is `RUN/checkpoints/step-NNNNNN/`, written into a temp folder, fsynced and renamed;
`manifest.json` (the size and SHA-256 of every file) is written last inside it, and `RUN/latest`
(a one-line text file naming the folder) is updated only after the rename. Optimizer tensors go
to safetensors and everything else to JSON: nothing is ever pickled.

The model files are a whole model dir (rank 0 writes them: a checkpoint loads like any model);
under FSDP the weights instead go through torch.distributed.checkpoint into `model/`, each rank
writing its own shard, so that no rank ever holds the whole model to save it (lmforge.model.io
assembles them on load). The optimizer state is written through torch.distributed.checkpoint in `optimizer/`, keyed by
parameter name: each rank writes its own part (its shard under FSDP; under DDP the replicated
tensors are split between ranks), as safetensors files whose headers carry each part's offsets,
so a checkpoint saved on N processes resumes on any number. Checkpoints from before (one
`optimizer.safetensors` keyed by parameter index) still resume, except under FSDP.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_dir, write_text_atomic
from lmforge.manifest import previous_good_hint, verify_manifest, write_manifest
from lmforge.model.io import WEIGHT_SHARDS_DIR, through_dcp
from lmforge.train.distributed import SINGLE, Distributed

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"  # the single-process format of lmforge <= 0.2
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_META = "optimizer.json"
RNG_FILE = "rng.safetensors"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


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


def save_optimizer(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, job: Distributed) -> None:
    """The optimizer state by parameter name: tensors through torch.distributed.checkpoint into
    folder/optimizer/ (every rank writes its part; a collective), the rest to optimizer.json (rank 0)."""
    osd = get_optimizer_state_dict(model, optimizer)
    tensors, scalars, shapes = {}, {}, {}
    for fqn, per_param in osd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{fqn}/{key}"] = value
                shapes[f"{fqn}/{key}"] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
            else:
                scalars[f"{fqn}/{key}"] = value
    with through_dcp(job.active):
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder / OPTIMIZER_DIR), save_distributed=True),
                 no_dist=not job.active)
    if job.is_main:
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
        write_text_atomic(folder / OPTIMIZER_META, json.dumps({"param_groups": groups, "scalars": scalars,
                                                               "tensors": shapes}, indent=1))


def save_model_shards(folder: Path, model: nn.Module, job: Distributed) -> None:
    """Every rank writes its shard of every weight into folder/model/ (a collective); a tied head
    is stored once, as tok_emb.weight, as in a model dir."""
    weights = get_model_state_dict(model)
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        weights.pop("lm_head.weight", None)
    with through_dcp(job.active):
        dcp.save(weights, storage_writer=dcp.HuggingFaceStorageWriter(str(folder / WEIGHT_SHARDS_DIR), save_distributed=True),
                 no_dist=not job.active)


def load_optimizer(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, job: Distributed) -> None:
    """Restore what `save_optimizer` wrote, on any number of ranks: each rank reads the parts of
    every tensor that its own shard covers (a collective)."""
    meta = json.loads((folder / OPTIMIZER_META).read_text())
    params = dict(model.named_parameters())
    templates = {}
    for name, info in meta["tensors"].items():
        fqn, _ = name.rsplit("/", 1)
        if fqn not in params:
            raise LmforgeError(f"{folder / OPTIMIZER_META}: optimizer state for {fqn}, which the model does not have")
        param, dtype = params[fqn], getattr(torch, info["dtype"])
        # A per-parameter tensor takes the parameter's layout (its DTensor shard under FSDP).
        templates[name] = (torch.zeros_like(param, dtype=dtype) if info["shape"] == list(param.shape)
                           else torch.zeros(info["shape"], dtype=dtype, device=param.device))
    with through_dcp(job.active):
        dcp.load(templates, storage_reader=dcp.HuggingFaceStorageReader(str(folder / OPTIMIZER_DIR)), no_dist=not job.active)
    state: dict[str, dict[str, Any]] = {}
    for name, value in [*templates.items(), *meta["scalars"].items()]:
        fqn, key = name.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})


def write_checkpoint_files(tmp: Path, step: int, write_model: Callable[[Path], None], state: dict) -> None:
    """Rank 0's part of a checkpoint, once the optimizer's parts are in `tmp`: model files, RNG, state, manifest."""
    write_model(tmp)
    save_file(rng_state(), str(tmp / RNG_FILE))
    write_text_atomic(tmp / STATE_FILE, json.dumps({**state, "step": step}, indent=1))
    write_manifest(tmp)


def publish_checkpoint(run_dir: Path, folder: Path, keep_last: int) -> None:
    """Point `latest` at the complete `folder` and delete all but the newest `keep_last`."""
    write_text_atomic(run_dir / LATEST, folder.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        # Renamed first: a kill mid-delete leaves a `.del-` leftover (removed on the next start), never
        # a half-deleted `step-*` folder that looks like a checkpoint.
        doomed = old.with_name(f".{old.name}.del-{os.getpid()}")
        os.replace(old, doomed)
        shutil.rmtree(doomed)


def save_checkpoint(
    run_dir: Path,
    step: int,
    write_model: Callable[[Path], None],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep_last: int,
    job: Distributed = SINGLE,
    gather: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    write_model_meta: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint `step` (called on every rank), point `latest` at it, and delete all but the
    newest `keep_last`. Rank 0 owns the temp folder and names it to the others; the folder is
    renamed into place only after every rank's part is in (a barrier), so a rank that dies
    mid-save leaves a temp folder, never a checkpoint that looks whole. `gather`: the context in
    which the model's parameters are whole (FSDP), entered on every rank around the model files.
    write_model_meta: writes the model dir without its weights; given, under FSDP every rank writes
    its shard of the weights instead (`save_model_shards`) and nothing is gathered."""
    folder = run_dir / CHECKPOINTS / checkpoint_name(step)
    sharded = job.strategy == "fsdp" and write_model_meta is not None
    with (atomic_dir(folder, overwrite=True) if job.is_main else contextlib.nullcontext()) as tmp:
        tmp = Path(job.broadcast(str(tmp) if job.is_main else None))
        save_optimizer(tmp, model, optimizer, job)
        if sharded:
            save_model_shards(tmp, model, job)
        with contextlib.nullcontext() if sharded else gather():
            job.barrier()  # every part is written
            if job.is_main:
                write_checkpoint_files(tmp, step, write_model_meta if sharded else write_model, state)
    if job.is_main:
        publish_checkpoint(run_dir, folder, keep_last)
    job.barrier()  # no rank runs ahead of a checkpoint that is not yet published
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


def load_checkpoint_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                          job: Distributed = SINGLE) -> dict:
    """Restore optimizer and RNG state from a verified checkpoint (on every rank); return the trainer state."""
    verify_checkpoint(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    if (folder / OPTIMIZER_FILE).exists():  # the single-process format, keyed by parameter index
        if job.strategy == "fsdp":
            raise LmforgeError(f"{folder}: a checkpoint of the single-process format (optimizer.safetensors) does not "
                               "resume under --strategy fsdp; resume it with --strategy ddp or on one process first")
        optimizer_from_tensors(optimizer, load_file(str(folder / OPTIMIZER_FILE)), state.pop("optimizer"))
    else:
        load_optimizer(folder, model, optimizer, job)
    set_rng_state(load_file(str(folder / RNG_FILE)))
    return state
