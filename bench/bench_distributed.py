"""Data-parallel training on CPU processes: 1 vs 2 processes (1 thread each, gloo) on nanoGPT's
CPU configuration (bench_train.py's char-level Shakespeare model), DDP and FSDP2.

Every run has the same global batch (12 x 64 tokens; 2 processes take 6 rows each), so tokens/s
compare directly: scaling efficiency = tokens/s on 2 / (2 x tokens/s on 1). The communication
share of a 2-process step is (its step time - the step time of 1 process on one rank's 6 rows) /
its step time: what the second process costs beyond its half of the compute (the gradient
all-reduce, or FSDP's all-gathers and reduce-scatter, plus waiting for the slower rank). Beside it,
the raw gloo all-reduce of one step's gradients (all parameters, fp32) timed alone.

Each configuration runs --runs times in fresh processes, interleaved; ms/step is the median over
steps after the first 20 (evaluation excluded), then the median across runs.

    .venv/bin/python bench/bench_distributed.py --runs 3 > bench/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from bench_train import NANOGPT_MODEL, NANOGPT_TRAIN, SHAKESPEARE, prepare
from benchutil import REPO

RUNNER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretrain import pretrain
    spec = json.loads(sys.argv[1])
    pretrain(spec["shards"], spec["model"], spec["out"], TrainConfig(**spec["train"]), overwrite=True, progress=False,
             sample_prompts=())
''')

ALLREDUCE = textwrap.dedent('''
    import json, sys, time
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    buf = torch.randn(int(sys.argv[1]))
    times = []
    for i in range(60):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - t)
    if dist.get_rank() == 0:
        times.sort()
        print(json.dumps({"ms": 1000 * times[len(times) // 2]}))
    dist.destroy_process_group()
''')


def run_one(work: Path, shards: Path, model_file: Path, name: str, nproc: int, batch: int, strategy: str, steps: int) -> float:
    """Median ms per optimizer step of one run (steps after the 20th)."""
    from lmforge.train.metrics import read_metrics

    out = work / name
    train = {**NANOGPT_TRAIN, "max_steps": steps, "batch_size": batch, "eval_every": 0, "eval_batches": 2,
             "strategy": strategy, "device": "cpu"}
    spec = json.dumps({"shards": str(shards), "model": str(model_file), "out": str(out), "train": train})
    runner = work / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launch = ([sys.executable, str(runner)] if nproc == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(runner)])
    subprocess.run(launch + [spec], check=True, env=env, capture_output=True, text=True)
    rows = read_metrics(out / "metrics.csv")
    tokens = NANOGPT_TRAIN["block_size"] * batch * nproc  # the step's tokens over all processes
    return statistics.median(1000 * tokens / float(r["tokens_per_s"]) for r in rows
                             if r["tokens_per_s"] and int(r["step"]) > 20)


def allreduce_ms(work: Path, numel: int) -> float:
    script = work / "allreduce.py"
    script.write_text(ALLREDUCE)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
                        str(numel)], check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(r.stdout.strip().splitlines()[-1])["ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    import yaml

    from lmforge.model.config import ModelConfig
    from lmforge.model.gpt import GPT

    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    shards = prepare(work, SHAKESPEARE)
    model_file = work / "model.yaml"
    model_file.write_text(yaml.safe_dump({"preset": "tiny", **NANOGPT_MODEL, "vocab_size": 70}))
    params = GPT(ModelConfig.from_dict({**NANOGPT_MODEL, "vocab_size": 70})).param_count()
    configs = {  # name: (processes, rows per process, strategy)
        "1 process, batch 12": (1, 12, "auto"),
        "1 process, batch 6 (one rank's compute)": (1, 6, "auto"),
        "2 processes DDP, 6 each": (2, 6, "ddp"),
        "2 processes FSDP, 6 each": (2, 6, "fsdp"),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.runs):  # interleaved rounds: drift of the machine hits every configuration alike
        for name, (nproc, batch, strategy) in configs.items():
            times[name].append(run_one(work, shards, model_file, f"r{len(times[name])}-{nproc}-{strategy}-{batch}",
                                       nproc, batch, strategy, args.steps))
    ms = {name: statistics.median(v) for name, v in times.items()}
    tokens = NANOGPT_TRAIN["block_size"] * 12
    one = ms["1 process, batch 12"]
    half = ms["1 process, batch 6 (one rank's compute)"]
    result = {
        "benchmark": "distributed",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads_per_process": 1, "backend": "gloo"},
        "model": {**NANOGPT_MODEL, "params": params},
        "global_batch": {"rows": 12, "block_size": NANOGPT_TRAIN["block_size"], "tokens": tokens},
        "runs": args.runs, "steps": args.steps,
        "configs": {name: {"ms_per_step": round(ms[name], 3), "ms_per_step_runs": [round(t, 3) for t in times[name]],
                           "tokens_per_s": round(1000 * NANOGPT_TRAIN["block_size"] * nproc * batch / ms[name], 1)}
                    for name, (nproc, batch, _) in configs.items()},
        "gloo_allreduce_ms_of_all_gradients": round(allreduce_ms(work, params), 3),
    }
    for name in ("2 processes DDP, 6 each", "2 processes FSDP, 6 each"):
        result["configs"][name]["scaling_efficiency"] = round(one / (2 * ms[name]), 3)
        result["configs"][name]["speedup_vs_1_process"] = round(one / ms[name], 3)
        result["configs"][name]["communication_share"] = round(max(0.0, ms[name] - half) / ms[name], 3)
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
