"""Fine-tuning memory and speed, each run in a fresh process.

`--part methods`: LoRA vs full fine-tuning of SmolLM2-135M-Instruct at sequence 512, batch 4
(continued pretraining on the start of tinyshakespeare.txt). Peak RSS is the process's own
high-water mark (ru_maxrss), which includes the model load; tokens/s is the median of the
per-step figures in metrics.csv after the first step (warm-up).

`--part peer`: LoRA through `lmforge.train.finetune` vs transformers + PEFT on the same 16 chats
(the kettle fact set of examples/fact_injection), batch 16, with the same token ids, the same
padded batches in the same order (built once here with lmforge's chat template and saved; the
lmforge run checks that its own batches are identical), the same LoRA (rank 16, alpha 32, no
dropout, on q, k, v, o, gate, up, down: lmforge's fused qkv and gate|up get one adapter pair per
part, which is PEFT's per-projection rank), AdamW with the same hyperparameters, clipping at 1.0,
fp32, 2 threads. lmforge runs without replay, retention check and evaluation (replay chats would
be tokens of their own: that is a different workload). tokens/s counts the real (unpadded) input
tokens of a step over its training time, the same count for both; the runs alternate, lmforge
first, and each figure is the median of the rounds' medians (first step dropped as warm-up).
Needs `peft` (a bench-only dependency: see bench/README.md).

    .venv/bin/python bench/bench_finetune.py --part methods --steps 6 > bench/results/finetune.json
    .venv/bin/python bench/bench_finetune.py --part peer --steps 8 --rounds 3 > bench/results/finetune_peer.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from benchutil import REPO, median, run_measured

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

METHODS_CHILD = """
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


PEER_STEPS_FILE = "batches.safetensors"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEER_LR = 1e-3

# Both children: the same step timing (first step dropped), tokens = real input tokens per step.
TIMING = """
def report(system, step_seconds, tokens, **extra):
    import json, resource, statistics
    steps = step_seconds[1:]
    print(json.dumps({{"system": system, "step_s_median": statistics.median(steps), "step_s": steps,
                      "tokens_per_step": tokens, "tokens_per_s": statistics.median(tokens[1:][i] / s for i, s in enumerate(steps)),
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}}))
"""

LMFORGE_CHILD = TIMING + """
from lmforge.allocator import use_huge_pages
use_huge_pages()  # first, as the CLI does: huge-page allocation must be on before torch loads
import torch
torch.set_num_threads(2)
from safetensors.torch import load_file
import lmforge.train.finetune as ft_mod
from lmforge.model.lora import LoRAConfig
from lmforge.train.config import FinetuneConfig, FinetuneTrainConfig
from lmforge.train.metrics import read_metrics

want = load_file({batches!r})
seen = {{}}

class Checked(ft_mod.SFTBatches):
    def train_batch(self, step, micro):
        batch = super().train_batch(step, micro)
        seen.setdefault(step, batch)
        return batch

ft_mod.SFTBatches = Checked
cfg = FinetuneTrainConfig(max_steps={steps}, batch_size=16, block_size=512, lr={lr}, min_lr={lr}, warmup_steps=0,
                          schedule="constant", eval_every=0, eval_batches=1, checkpoint_every=0, log_every=1, device="cpu",
                          activation_checkpointing={ckpt}, heap={heap!r})
s = ft_mod.finetune("smollm2-135m-instruct", {data!r}, {out!r},
                    FinetuneConfig(method="lora", replay=0.0, retention_tolerance=0.0), cfg,
                    LoRAConfig(rank=16, alpha=32.0, dropout=0.0), val_data={val!r}, progress=False, sample_count=0)
for step in range({steps}):
    x, y = seen[step]
    assert torch.equal(x, want[f"x{{step}}"]) and torch.equal(y, want[f"y{{step}}"]), f"step {{step}}: batches differ"
tokens = [int(want[f"n{{step}}"]) for step in range({steps})]
rows = [r for r in read_metrics(__import__("pathlib").Path({out!r}) / "metrics.csv") if r["tokens_per_s"]]
# metrics.csv: tokens_per_s = the Trainer's tokens per step (batch x mean example length) / the
# step's training seconds (evaluation and checkpoints excluded).
step_seconds = [(s["tokens_seen"] / s["steps"]) / float(r["tokens_per_s"]) for r in rows]
report({system!r}, step_seconds, tokens, trainable_params=s["trainable_params"])
"""

HF_CHILD = TIMING + """
import time
import torch
torch.set_num_threads(2)
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

want = load_file({batches!r})
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained({hf!r}, torch_dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules={targets!r},
                                         task_type="CAUSAL_LM"))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr={lr}, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
step_seconds = []
for step in range({steps}):
    x, y = want[f"x{{step}}"], want[f"y{{step}}"]
    t = time.perf_counter()
    logits = model(input_ids=x, attention_mask=want[f"m{{step}}"]).logits
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_seconds.append(time.perf_counter() - t)
report("transformers+peft", step_seconds, [int(want[f"n{{step}}"]) for step in range({steps})],
       trainable_params=sum(p.numel() for p in params))
"""


def methods(steps: int) -> dict:
    if not SHAKESPEARE.is_file():
        raise SystemExit(f"{SHAKESPEARE}: not found")
    results = {"setup": {"model": "smollm2-135m-instruct", "seq": 512, "batch": 4, "steps": steps}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shakespeare.txt"
        data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
        for method, lr in (("lora", 3e-4), ("full", 3e-5)):
            code = METHODS_CHILD.format(steps=steps, data=str(data), out=str(Path(tmp) / method), method=method, lr=lr)
            results[method] = run_measured(code, env={"OMP_NUM_THREADS": "2"})
    results["lora_vs_full_rss"] = results["lora"]["ru_maxrss_mb"] / results["full"]["ru_maxrss_mb"]
    return results


def peer_batches(tmp: Path, steps: int) -> tuple[Path, Path, Path]:
    """The 16 chats (+ 4 val chats lmforge evaluates once at the end, outside the timing) and the
    padded batches both systems train on, as lmforge's SFTBatches orders and pads them."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "examples" / "fact_injection"))
    from make_data import build

    from lmforge.interop.registry import resolve_model_dir
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.config import FinetuneTrainConfig
    from lmforge.train.sft import SFTBatches, load_examples

    sets = build()
    for name, records in (("train", sets["train"][:16]), ("val", sets["val"])):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tok = Tokenizer.load(resolve_model_dir("smollm2-135m-instruct"))
    examples, _ = load_examples(tmp / "train.jsonl", tok, block_size=512, fmt="chat")
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    # FinetuneTrainConfig's seed: the one the lmforge child runs with
    batches = SFTBatches(examples, [], batch_size=16, grad_accum=1, pad_id=pad, seed=FinetuneTrainConfig().seed)
    tensors = {}
    for step in range(steps):
        x, y = batches.train_batch(step, 0)
        # The real (unpadded) input tokens: each row up to its last target.
        real = torch.zeros_like(x)
        for b, row in enumerate(batches.rows_at(step, 0)):
            real[b, : sum(len(e.ids) for e in row) - 1] = 1
        tensors.update({f"x{step}": x, f"y{step}": y, f"m{step}": real, f"n{step}": real.sum().reshape(1)})
    path = tmp / PEER_STEPS_FILE
    save_file(tensors, str(path))
    return tmp / "train.jsonl", tmp / "val.jsonl", path


def peer(steps: int, rounds: int, with_checkpointing: bool, heaps: list[str]) -> dict:
    results: dict = {"setup": {"model": "smollm2-135m-instruct", "chats": 16, "batch": 16, "steps": steps, "rounds": rounds,
                               "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "targets": HF_TARGETS}, "lr": PEER_LR,
                               "precision": "fp32", "threads": 2}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train, val, batches = peer_batches(tmp, steps)
        hf = tmp / "hf"
        subprocess.run([sys.executable, "-m", "lmforge", "convert", "smollm2-135m-instruct", str(hf), "--to", "hf"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        # name -> (activation checkpointing, heap policy); "lmforge" is the default fine-tune
        ours = {"lmforge": (False, "pool"),
                **{f"lmforge, --heap {heap}": (False, heap) for heap in heaps},
                **({"lmforge, activation checkpointing": (True, "keep")} if with_checkpointing else {})}
        runs: dict[str, list[dict]] = {**{name: [] for name in ours}, "transformers+peft": []}
        for r in range(rounds):  # interleaved: a busy spell hits both
            for i, (name, (ckpt, heap)) in enumerate(ours.items()):
                code = LMFORGE_CHILD.format(steps=steps, data=str(train), val=str(val), out=str(tmp / f"lmforge-{r}-{i}"),
                                            batches=str(batches), lr=PEER_LR, ckpt=ckpt, heap=heap, system=name)
                runs[name].append(run_measured(code, env={"OMP_NUM_THREADS": "2"}))
            code = HF_CHILD.format(steps=steps, batches=str(batches), hf=str(hf), targets=HF_TARGETS, lr=PEER_LR)
            runs["transformers+peft"].append(run_measured(code, env={"OMP_NUM_THREADS": "2"}))
    for system, rs in runs.items():
        results[system] = {
            "tokens_per_s": round(median(r["tokens_per_s"] for r in rs), 1),
            "step_s": round(median(r["step_s_median"] for r in rs), 3),
            "peak_rss_mb": round(median(r["peak_rss_mb"] for r in rs), 1),
            "tokens_per_step": rs[0]["tokens_per_step"][1:], "trainable_params": rs[0]["trainable_params"], "runs": rs,
        }
    theirs = results["transformers+peft"]
    for name in ours:  # vs the peer: tokens/s (want >= 1.2) and peak RSS (want <= 0.5)
        results[name]["speedup"] = round(results[name]["tokens_per_s"] / theirs["tokens_per_s"], 3)
        results[name]["rss_ratio"] = round(results[name]["peak_rss_mb"] / theirs["peak_rss_mb"], 3)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("methods", "peer", "all"), default="all")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3, help="peer: interleaved runs per system")
    ap.add_argument("--with-checkpointing", action="store_true", help="peer: also lmforge with activation checkpointing")
    ap.add_argument("--heaps", default="", help="peer: also lmforge with these --heap policies (comma-separated: keep,release)")
    args = ap.parse_args()
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": 2}}
    if args.part in ("methods", "all"):
        results["methods"] = methods(args.steps)
    if args.part in ("peer", "all"):
        results["peer"] = peer(args.steps, args.rounds, args.with_checkpointing, [h for h in args.heaps.split(",") if h])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
