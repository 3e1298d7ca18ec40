"""Data-parallel training on torch.distributed, as launched by torchrun.

`torchrun --nproc-per-node N -m lmforge pretrain ...` starts N copies of the same command; each
reads its rank from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).
This module turns that environment into a `Distributed` (rank, world size, strategy) and the
wrapped model; the Trainer asks it for reductions and stays one loop. Strategies:

- ddp: every rank holds the whole model; gradients are averaged by DistributedDataParallel.
- fsdp: FSDP2 `fully_shard` on every block and on the root: parameters, gradients and optimizer
  state are split across ranks and gathered a block at a time.

A step's batch is the same windows whatever the world size (the data sources draw the global
batch from (seed, step) and each rank takes its slice), so 1 process x 8 rows and 2 x 4 are the
same run. The backend follows the device: gloo on CPU, nccl on CUDA. Collectives time out after
`--dist-timeout` seconds, so a rank that dies never leaves the others waiting for ever.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.runtime import resolve_device

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the job. The default is one process, no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp (resolved: never auto)

    @property
    def is_main(self) -> bool:
        """The rank that prints, writes metrics, reports, best/ and the checkpoint's model files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group exists: reductions and barriers must be called on every rank."""
        return self.world_size > 1 or self.strategy != "none"

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over all ranks, in place (and returned); a no-op on one process."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (same shape on all), concatenated in rank order."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's `value` (any JSON-like object), on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Distributed()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def setup(strategy: str, device_name: str, timeout_s: float) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes (once per process) and pick this rank's device.

    Without torchrun the run is one process: --strategy ddp/fsdp are refused rather than quietly
    ignored, since the user asked for several processes and would get one.
    """
    if strategy not in STRATEGIES:
        raise LmforgeError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not launched_by_torchrun():
        if strategy in ("ddp", "fsdp"):
            raise LmforgeError(f"--strategy {strategy} needs several processes: launch with "
                               "`torchrun --nproc-per-node N -m lmforge ...` (or use --strategy auto)")
        return SINGLE, resolve_device(device_name)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _rank_device(device_name, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    resolved = ("ddp" if world > 1 else "none") if strategy == "auto" else strategy
    if rank != 0:
        # Rank 0 tells the story; the others' stdout (the same lines N times) is muted. Their stderr
        # stays: every rank reports its own errors.
        global _muted_stdout
        _muted_stdout = sys.stdout
        sys.stdout = open(os.devnull, "w")
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, strategy=resolved), device


@contextlib.contextmanager
def launched_run(out, command: str, cfg, *, new: bool, overwrite: bool) -> Iterator[tuple[object, Distributed, torch.device]]:
    """(run dir, job, device) for a training command, on every rank: the process group joined (and
    left at the end), the run dir owned by rank 0 (lock, moving an old run aside, every file but the
    other ranks' optimizer parts). The other ranks only know its path; the caller meets rank 0 at a
    barrier once rank 0 has set the dir up."""
    from types import SimpleNamespace

    from lmforge.train.runlock import own_run_dir  # runlock imports checkpoint, which imports this module

    job, device = setup(cfg.strategy, cfg.device, cfg.dist_timeout)
    try:
        if job.is_main:
            with own_run_dir(out, command, new=new, overwrite=overwrite) as run:
                yield run, job, device
        else:
            yield SimpleNamespace(path=Path(out), start_new=lambda: None, checkpointed=lambda folder=None: None), job, device
    finally:
        teardown()


def follower_summary(job: Distributed, result) -> dict:
    """What a rank other than 0 returns from a training command: rank 0 reports."""
    return {"rank": job.rank, "steps": result.step, "signal": result.signal, "checkpoint": str(result.checkpoint)}


def teardown() -> None:
    """Leave the process group (end of the command)."""
    global _muted_stdout
    if dist.is_initialized():
        dist.destroy_process_group()
    if _muted_stdout is not None:
        sys.stdout.close()
        sys.stdout, _muted_stdout = _muted_stdout, None


_muted_stdout = None


def _rank_device(name: str, local_rank: int) -> torch.device:
    """auto/cuda mean this rank's own GPU (cuda:LOCAL_RANK); an explicit cuda:K is taken as given."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    device = resolve_device("cpu" if name == "auto" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def choose_strategy(job: Distributed, cfg, fits: Callable[[int], dict]) -> tuple[Distributed, dict]:
    """(the job's strategy, its memory estimate). `fits(shards)` is the memory check of one rank
    when weights, gradients and optimizer state are split over `shards` ranks: it returns the
    estimate, or raises an LmforgeError when it does not fit. --strategy auto on several ranks is
    DDP unless the model does not fit one rank whole and fits once split: then FSDP."""
    if job.strategy == "fsdp":
        return job, fits(job.world_size)
    if cfg.strategy != "auto" or job.world_size == 1:
        return job, fits(1)
    try:
        return job, fits(1)
    except LmforgeError:
        estimate = fits(job.world_size)  # does not fit split either: that error is the one to show
    if job.is_main:
        print(f"[lmforge] the model does not fit one rank whole: --strategy auto shards it with fsdp over "
              f"{job.world_size} ranks", flush=True)
    return replace(job, strategy="fsdp"), estimate


def describe_batch(cfg, block_size: int, job: Distributed) -> str:
    """The step's batch in the terms people size runs by: per rank x ranks x accumulation."""
    rows = cfg.batch_size * job.world_size * cfg.grad_accum
    if not job.active:
        return f"{cfg.batch_size} x {block_size} tokens x {cfg.grad_accum} accum per step"
    return (f"global batch {cfg.batch_size} per rank x {job.world_size} ranks x {cfg.grad_accum} accum = {rows} x "
            f"{block_size} = {rows * block_size:,} tokens per step ({job.strategy}, {dist.get_backend()})")


def wrap_model(model: nn.Module, job: Distributed, device: torch.device) -> nn.Module:
    """The module the training step calls: `model` itself, under DDP, or sharded in place by FSDP2
    (then `model`'s own parameters become DTensors, and `model` is what is returned)."""
    if job.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers off: the only buffers are RoPE tables and masks, equal on every rank by
        # construction, and a broadcast inside forward would make evaluation a collective.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    if job.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        units = [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        return model
    return model


def rebind_param_groups(param_groups: list[dict], model: nn.Module, before: dict[int, str]) -> list[dict]:
    """Point optimizer groups made before FSDP at the parameters FSDP put in their place
    (`before`: id(parameter) -> its name, taken before sharding)."""
    now = dict(model.named_parameters())
    return [{**g, "params": [now[before[id(p)]] for p in g["params"]]} for g in param_groups]


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective); a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def reshard(model: nn.Module, job: Distributed) -> None:
    """Under FSDP, put every module back on its sharded parameters. A forward pass without a
    backward (evaluation) leaves the root module's parameters gathered, and the optimizer's state
    is keyed by the sharded ones; a no-op for the other strategies."""
    if job.strategy != "fsdp":
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def gathered(model: nn.Module, job: Distributed) -> Iterator[None]:
    """Under FSDP, the model's sharded parameters stand in as whole plain tensors inside the block,
    so that rank 0 writes the model files with the usual single-file writer. Called on every rank
    (each gather is a collective, in the same module order everywhere); the sharded parameters are
    put back after. A no-op for the other strategies."""
    if job.strategy != "fsdp":
        yield
        return
    reshard(model, job)
    whole: dict[int, nn.Parameter] = {}
    swapped = []
    # FSDP's state-dict pre-hooks put the sharded parameters back before a state_dict() is taken:
    # set aside while the whole ones stand in, so that the writer sees those.
    hooks = {m: dict(m._state_dict_pre_hooks) for m in model.modules() if m._state_dict_pre_hooks}
    for m in hooks:
        m._state_dict_pre_hooks.clear()
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None or not hasattr(param, "full_tensor"):
                    continue
                if id(param) not in whole:  # a tied weight is gathered once and stays tied
                    whole[id(param)] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                swapped.append((module, name, param))
                module._parameters[name] = whole[id(param)]
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
        for m, saved in hooks.items():
            m._state_dict_pre_hooks.update(saved)


@contextlib.contextmanager
def gradient_sync(forward_model: nn.Module, job: Distributed, sync: bool) -> Iterator[None]:
    """Inner micro-steps of gradient accumulation skip the gradient all-reduce (DDP no_sync, FSDP's
    requires_gradient_sync); the last one syncs the accumulated sum once."""
    if job.strategy == "ddp" and not sync:
        with forward_model.no_sync():
            yield
        return
    if job.strategy == "fsdp":
        forward_model.set_requires_gradient_sync(sync)
    yield
