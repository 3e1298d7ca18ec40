"""Fine-tuning memory and speed: LoRA vs full fine-tuning of SmolLM2-135M-Instruct at sequence
512, batch 4 (continued pretraining on the start of tinyshakespeare.txt), each in a fresh process.

Peak RSS is the process's own high-water mark (ru_maxrss), which includes the model load;
tokens/s is the median of the per-step figures in metrics.csv after the first step (warm-up).

    .venv/bin/python bench/bench_finetune.py --steps 6 > bench/results/finetune.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from benchutil import REPO, run_measured

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

CHILD = """
import json, resource, statistics
from lmforge.allocator import use_huge_pages
use_huge_pages()  # first, as the CLI does: huge-page allocation must be on before torch loads
import torch
torch.set_num_threads(2)
from lmforge.model.lora import LoRAConfig
from lmforge.train.config import FinetuneConfig, FinetuneTrainConfig
from lmforge.train.finetune import finetune
from lmforge.train.metrics import read_metrics
cfg = FinetuneTrainConfig(max_steps={steps}, batch_size=4, block_size=512, eval_every=0, eval_batches=1,
                          checkpoint_every=0, early_stop=0, lr={lr}, device="cpu")
s = finetune("smollm2-135m-instruct", {data!r}, {out!r}, FinetuneConfig(method={method!r}, val_fraction=0.1), cfg,
             LoRAConfig(), progress=False, sample_count=0)
rows = read_metrics(__import__("pathlib").Path({out!r}) / "metrics.csv")
tps = [float(r["tokens_per_s"]) for r in rows if r["tokens_per_s"]][1:]
print(json.dumps({{"method": {method!r}, "trainable_params": s["trainable_params"], "total_params": s["total_params"],
                  "tokens_per_s_median": statistics.median(tps), "tokens_per_s_steps": tps,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if not SHAKESPEARE.is_file():
        raise SystemExit(f"{SHAKESPEARE}: not found")
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": 2},
               "setup": {"model": "smollm2-135m-instruct", "seq": 512, "batch": 4, "steps": args.steps}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shakespeare.txt"
        data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
        for method, lr in (("lora", 3e-4), ("full", 3e-5)):
            code = CHILD.format(steps=args.steps, data=str(data), out=str(Path(tmp) / method), method=method, lr=lr)
            r = run_measured(code, env={"OMP_NUM_THREADS": "2"})
            results[method] = r
    results["lora_vs_full_rss"] = results["lora"]["ru_maxrss_mb"] / results["full"]["ru_maxrss_mb"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
