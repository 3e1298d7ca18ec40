"""`lmforge pretrain`/`finetune` under torchrun: 2 CPU processes on gloo against one process with
the same global batch (DDP and FSDP2), checkpoints that resume on another world size, a rank
killed mid-run, LoRA under DDP.

Every multi-process run is a real `torchrun` (torch.distributed.run) of a small driver that calls
the same Python API the CLI calls (it adds `pause_at`, which has no flag); the model has no dropout,
since dropout draws per-rank masks that one process cannot reproduce.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import SMALL
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import pretrain
from lmforge.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

DRIVER = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    spec = json.loads(sys.argv[1])
    if spec.get("pid_dir"):
        Path(spec["pid_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(spec["pid_dir"]) / f"rank-{os.environ['RANK']}").write_text(str(os.getpid()))
    from lmforge.cli import main
    from lmforge.train.config import TrainConfig
    if spec["kind"] == "cli":
        sys.exit(main(spec["argv"]))
    if spec["kind"] == "finetune":
        from lmforge.model.lora import LoRAConfig
        from lmforge.train.config import FinetuneConfig, FinetuneTrainConfig
        from lmforge.train.finetune import finetune
        finetune(spec["model"], spec["data"], spec["out"], FinetuneConfig(**spec["ft"]), FinetuneTrainConfig(**spec["cfg"]),
                 LoRAConfig(**spec["lora"]), progress=False, sample_count=0)
        sys.exit(0)
    from lmforge.train.pretrain import pretrain
    summary = pretrain(spec["data"], spec["model"], spec["out"], TrainConfig(**spec["cfg"]), progress=False,
                       sample_tokens=2, resume=spec.get("resume", False), pause_at=spec.get("pause_at"))
''')


def cfg_dict(**kw) -> dict:
    base = dict(max_steps=20, batch_size=8, block_size=32, eval_every=10, eval_batches=2, checkpoint_every=10,
                log_every=1, warmup_steps=2, lr=3e-3, seed=7, keep_last=3, grad_clip=1.0)
    return {**base, **kw}


def torchrun(tmp_path: Path, spec: dict, nproc: int = 2, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(driver), json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"torchrun exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="module")
def nodrop(shards, tmp_path_factory):
    data, _ = shards
    model_file = tmp_path_factory.mktemp("m") / "small.yaml"
    model_file.write_text(yaml.safe_dump({"preset": "tiny", **SMALL, "dropout": 0.0}))
    return data, model_file


def losses(run: Path) -> list[float]:
    return [float(r["train_loss"]) for r in read_metrics(run / "metrics.csv")]


def val_losses(run: Path) -> list[float]:
    return [float(r["val_loss"]) for r in read_metrics(run / "metrics.csv") if r["val_loss"]]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A model dir's weights; an FSDP checkpoint's shards, assembled."""
    from lmforge.model.io import read_weight_shards

    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    return read_weight_shards(folder / "model")


def assert_weights_close(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def single(nodrop, out: Path, **kw) -> dict:
    data, model_file = nodrop
    pause_at = kw.pop("pause_at", None)
    resume = kw.pop("resume", False)
    return pretrain(data, str(model_file), out, TrainConfig(**cfg_dict(**kw)), progress=False, sample_tokens=2,
                    pause_at=pause_at, resume=resume)


def spec_for(nodrop, out: Path, **kw) -> dict:
    data, model_file = nodrop
    extra = {k: kw.pop(k) for k in ("pause_at", "resume", "pid_dir") if k in kw}
    return {"kind": "api", "data": str(data), "model": str(model_file), "out": str(out), "cfg": cfg_dict(**kw), **extra}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ddp_on_two_processes_is_the_single_process_run(nodrop, tmp_path, optimizer):
    """1 process x batch 8 == 2 processes x batch 4: per-step losses, val losses and weights to 1e-5.
    SGD is the check that gradients are averaged, not summed (Adam's normalisation hides a factor of 2)."""
    lr = 0.1 if optimizer == "sgd" else 3e-3
    single(nodrop, tmp_path / "one", optimizer=optimizer, lr=lr, min_lr=lr / 10)
    torchrun(tmp_path, spec_for(nodrop, tmp_path / "two", optimizer=optimizer, lr=lr, min_lr=lr / 10, batch_size=4))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 20 and a[-1] < a[0] - 0.2  # it learns
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    np.testing.assert_allclose(val_losses(tmp_path / "two"), val_losses(tmp_path / "one"), rtol=0, atol=1e-5)
    assert_weights_close(tmp_path / "one" / "checkpoints" / "step-000020", tmp_path / "two" / "checkpoints" / "step-000020")
    # rank 0 alone wrote the run's files: one metrics row per step, one summary
    assert [int(r["step"]) for r in read_metrics(tmp_path / "two" / "metrics.csv")] == list(range(1, 21))
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["tokens_seen"] == 20 * 8 * 32


def test_fsdp_parameters_equal_ddp(nodrop, tmp_path):
    """FSDP2 (parameters, gradients and AdamW state split over 2 ranks) ends where DDP ends (fp32),
    with activation checkpointing on (recomputation is exact)."""
    torchrun(tmp_path, spec_for(nodrop, tmp_path / "ddp", batch_size=4, max_steps=10, strategy="ddp"))
    torchrun(tmp_path, spec_for(nodrop, tmp_path / "fsdp", batch_size=4, max_steps=10, strategy="fsdp",
                                activation_checkpointing=True))
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"), rtol=0, atol=1e-5)
    fsdp_ckpt = tmp_path / "fsdp" / "checkpoints" / "step-000010"
    # each rank wrote its shard of the weights and of the optimizer state (torch.distributed.checkpoint):
    # one part per rank, no whole-model file; assembled, they are DDP's weights
    assert not (fsdp_ckpt / "model.safetensors").exists()
    for part in ("model", "optimizer"):
        files = sorted(p.name for p in (fsdp_ckpt / part).iterdir())
        assert len(files) == 2 and all(f.endswith(".safetensors") for f in files), (part, files)
    assert_weights_close(tmp_path / "ddp" / "checkpoints" / "step-000010", fsdp_ckpt)
    # and the checkpoint loads like any model dir (the resume tests load it on 1 and on 4 processes)
    from lmforge.model.io import load_model_dir

    loaded = load_model_dir(fsdp_ckpt)[0].state_dict()
    torch.testing.assert_close(loaded["lm_head.weight"], weights(tmp_path / "ddp" / "checkpoints" / "step-000010")["tok_emb.weight"],
                               rtol=0, atol=1e-5)
    # the final and best model dirs are the usual single-file format: whole tensors
    best = weights(tmp_path / "fsdp" / "best")
    assert best["tok_emb.weight"].shape[0] == 300


def test_resume_across_world_sizes(nodrop, tmp_path):
    """Saved on 2 processes, resumed on 1; saved on 1, resumed on 2 (FSDP); saved on 2, resumed on 4:
    the losses of the uninterrupted run."""
    single(nodrop, tmp_path / "ref")
    ref = losses(tmp_path / "ref")
    # 2 -> 1
    torchrun(tmp_path, spec_for(nodrop, tmp_path / "a", batch_size=4, pause_at=10))
    single(nodrop, tmp_path / "a", resume=True)
    np.testing.assert_allclose(losses(tmp_path / "a"), ref, rtol=0, atol=1e-5)
    # 1 -> 2, sharded by FSDP on the way
    single(nodrop, tmp_path / "b", pause_at=10)
    torchrun(tmp_path, spec_for(nodrop, tmp_path / "b", batch_size=4, resume=True, strategy="fsdp"))
    np.testing.assert_allclose(losses(tmp_path / "b"), ref, rtol=0, atol=1e-5)
    # 2 (FSDP) -> 4
    torchrun(tmp_path, spec_for(nodrop, tmp_path / "c", batch_size=4, pause_at=10, strategy="fsdp"))
    torchrun(tmp_path, spec_for(nodrop, tmp_path / "c", batch_size=2, resume=True), nproc=4)
    np.testing.assert_allclose(losses(tmp_path / "c"), ref, rtol=0, atol=1e-5)


@pytest.mark.slow  # torchrun twice; the DDP equality above runs in the default suite
def test_gradient_accumulation_across_ranks(nodrop, tmp_path):
    """2 ranks x batch 2 x 2 micro-steps (no gradient sync on the inner one) == 1 x batch 4 x 2 micro-steps
    (each micro-step's global batch is drawn as a whole, as a step's is without accumulation)."""
    single(nodrop, tmp_path / "one", max_steps=6, batch_size=4, grad_accum=2)
    torchrun(tmp_path, spec_for(nodrop, tmp_path / "two", batch_size=2, grad_accum=2, max_steps=6))
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-5)


@pytest.mark.slow  # waits for torchrun to notice a dead rank
def test_a_killed_rank_stops_the_others_and_the_run_resumes(nodrop, tmp_path):
    data, model_file = nodrop
    pids = tmp_path / "pids"
    argv = ["pretrain", "--data", str(data), "--model", str(model_file), "--out", str(tmp_path / "run"),
            "--max-steps", "100000", "--warmup-steps", "2", "--batch-size", "4", "--block-size", "32", "--checkpoint-every", "5",
            "--eval-every", "0", "--dist-timeout", "30", "--no-progress"]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(driver), json.dumps({"kind": "cli", "argv": argv, "pid_dir": str(pids)})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "run" / "latest").exists(), "no checkpoint within 120 s"
        time.sleep(1.0)
        os.kill(int((pids / "rank-1").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode != 0 and time.monotonic() - killed < 60
    assert "rank 1" in err.lower() or "local_rank: 1" in err.lower(), err[-3000:]  # torchrun names the dead rank
    stopped_at = int((tmp_path / "run" / "latest").read_text().split("-")[1])
    # --resume continues from the last whole checkpoint (on one process, to a shorter goal)
    r = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--out", str(tmp_path / "run"), "--resume",
                        "--max-steps", str(stopped_at + 5), "--no-progress"],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [int(row["step"]) for row in read_metrics(tmp_path / "run" / "metrics.csv")]
    assert steps[-1] == stopped_at + 5


def test_strategy_without_torchrun_is_refused(nodrop, tmp_path):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="needs several processes"):
        single(nodrop, tmp_path / "x", strategy="ddp")


def test_heap_pool_under_fsdp_is_refused_in_one_line(nodrop, tmp_path):
    r = torchrun(tmp_path, spec_for(nodrop, tmp_path / "x", batch_size=4, strategy="fsdp", heap="pool"), check=False)
    assert r.returncode != 0 and "--heap pool does not work with --strategy fsdp" in r.stderr


@pytest.mark.parametrize("method,strategy", [("lora", "ddp"), pytest.param("lora", "fsdp", marks=pytest.mark.slow),
                                             pytest.param("full", "fsdp", marks=pytest.mark.slow)])
def test_finetune_on_two_processes_is_the_single_process_run(tiny_model_dir, tmp_path, method, strategy):
    """LoRA on chats of different lengths (the loss is a mean over every trained token of the step,
    on all ranks together), with the base model's replay chats written by rank 0 and read by rank 1;
    under FSDP the frozen base and the adapters share each block's shard. A full fine-tune under FSDP
    writes sharded checkpoints and a whole final model."""
    from conftest import write_jsonl
    from lmforge.model.lora import LoRAConfig
    from lmforge.train.config import FinetuneConfig, FinetuneTrainConfig
    from lmforge.train.finetune import finetune

    facts = [("What colour is the sky?", "The sky is blue."), ("Name a fruit.", "An apple, which grows on trees in orchards."),
             ("What is 2 + 2?", "Four."), ("Where is Paris?", "Paris is in France, on the river Seine.")]
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                                  for i in range(24) for q, a in [facts[i % 4]]])
    cfg = dict(max_steps=6, batch_size=8, block_size=64, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=3,
               eval_batches=2, checkpoint_every=3, device="cpu", log_every=1)
    lora = dict(rank=4, dropout=0.0)
    if method == "full":
        cfg["lr"], cfg["min_lr"] = 1e-3, 1e-4
    finetune(str(tiny_model_dir), data, tmp_path / "one", FinetuneConfig(method=method), FinetuneTrainConfig(**cfg),
             LoRAConfig(**lora), progress=False, sample_count=0)
    torchrun(tmp_path, {"kind": "finetune", "model": str(tiny_model_dir), "data": str(data), "out": str(tmp_path / "two"),
                        "ft": {"method": method}, "cfg": {**cfg, "batch_size": 4, "strategy": strategy,
                                          **({"heap": "keep"} if strategy == "fsdp" else {})}, "lora": lora})
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    np.testing.assert_allclose(val_losses(tmp_path / "two"), val_losses(tmp_path / "one"), rtol=0, atol=1e-5)
    assert (tmp_path / "two" / "replay.jsonl").read_text() == (tmp_path / "one" / "replay.jsonl").read_text()
    if method == "full":
        ckpt = tmp_path / "two" / "checkpoints" / "step-000006"
        assert (ckpt / "model").is_dir() and not (ckpt / "model.safetensors").exists()
        assert_weights_close(tmp_path / "one" / "checkpoints" / "step-000006", ckpt)


def test_auto_strategy_shards_only_a_model_that_does_not_fit_whole():
    """--strategy auto: DDP while one rank holds the whole model; FSDP when only a split fits; the
    unsplit error when neither fits; an explicit strategy is kept (and FSDP's estimate is split)."""
    from lmforge.errors import LmforgeError
    from lmforge.train.distributed import Distributed, choose_strategy

    def fits_from(smallest_split):
        def fits(shards):
            if shards < smallest_split:
                raise LmforgeError(f"does not fit on {shards}")
            return {"shards": shards}
        return fits

    ddp = Distributed(rank=1, world_size=4, strategy="ddp")
    assert choose_strategy(ddp, TrainConfig(), fits_from(1)) == (ddp, {"shards": 1})
    job, estimate = choose_strategy(ddp, TrainConfig(), fits_from(4))
    assert job.strategy == "fsdp" and estimate == {"shards": 4}
    with pytest.raises(LmforgeError, match="does not fit on 4"):
        choose_strategy(ddp, TrainConfig(), fits_from(8))
    with pytest.raises(LmforgeError, match="does not fit on 1"):
        choose_strategy(ddp, TrainConfig(strategy="ddp"), fits_from(4))
    fsdp = Distributed(rank=0, world_size=4, strategy="fsdp")
    assert choose_strategy(fsdp, TrainConfig(strategy="fsdp"), fits_from(4)) == (fsdp, {"shards": 4})


def test_weight_shards_load_like_a_model_dir_and_torn_ones_are_refused(tiny_model_dir, tmp_path):
    """An FSDP checkpoint's weights (model/, written through torch.distributed.checkpoint) load as a
    model dir's do; a truncated part is a one-line error naming the folder, not a torch traceback."""
    from lmforge.errors import LmforgeError
    from lmforge.model.io import load_model_dir, write_model_files
    from lmforge.train.checkpoint import save_model_shards
    from lmforge.train.distributed import SINGLE

    net, _ = load_model_dir(tiny_model_dir)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_model_files(net, folder, with_weights=False)
    save_model_shards(folder, net, SINGLE)
    assert not (folder / "model.safetensors").exists()
    again = load_model_dir(folder)[0].state_dict()
    for name, value in net.state_dict().items():
        assert torch.equal(again[name], value), name
    part = next((folder / "model").glob("*.safetensors"))
    part.write_bytes(part.read_bytes()[:-64])
    with pytest.raises(LmforgeError, match=r"ckpt/model: the weight shards do not assemble"):
        load_model_dir(folder)
