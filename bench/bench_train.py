"""Training throughput on nanoGPT's CPU configuration (char-level Shakespeare, 4 layers, 4 heads,
128 wide, block 64, batch 12, AdamW lr 1e-3, 2000 iterations, dropout 0), plus MFU of a ~10M
parameter model.

Each configuration runs --runs times in a fresh process (2 threads), in interleaved rounds. ms/iter is the median over
steady-state steps (after the first 20; evaluation excluded) of each run, then the median across
runs; tokens/s = 12 x 64 / iter time. Side by side in the same run, eager and compiled: nanoGPT's
model and train.py step on a CPU (rewritten in `nanogpt_peer_model` and `nanogpt_peer_run`: a fresh
np.memmap and torch.stack per batch, AdamW without fused or foreach kernels).

    .venv/bin/python bench/bench_train.py --runs 3 > bench/results/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from benchutil import REPO, run_measured

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_MODEL = {"name": "nanogpt-shakespeare-char", "n_layer": 4, "n_head": 4, "n_kv_head": 4, "n_embd": 128,
                 "intermediate_size": 512, "block_size": 64, "norm": "layernorm", "mlp": "gelu_exact",
                 "position": "learned", "bias": False, "tie_embeddings": True, "dropout": 0.0}
NANOGPT_TRAIN = {"max_steps": 2000, "batch_size": 12, "block_size": 64, "lr": 1e-3, "min_lr": 1e-4,
                 "warmup_steps": 100, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 250,
                 "eval_batches": 20, "checkpoint_every": 0, "log_every": 1, "seed": 1337}
TEN_M_MODEL = {**NANOGPT_MODEL, "name": "10m", "n_layer": 6, "n_head": 6, "n_kv_head": 6, "n_embd": 384,
               "intermediate_size": 1536, "block_size": 256}


def prepare(work: Path, data: Path) -> Path:
    from lmforge.data.pack import PackConfig, pack_corpus
    from lmforge.data.sources import DocumentReader
    from lmforge.tokenizer import TokenizerTrainConfig, save_tokenizer_dir, train_tokenizer

    shards = work / "shards"
    if not shards.exists():
        text = [d.text for d in DocumentReader([data])]
        tok = train_tokenizer(text, TokenizerTrainConfig(kind="char", vocab_size=70, min_frequency=1), show_progress=False)
        save_tokenizer_dir(tok, work / "tok", overwrite=True)
        pack_corpus([data], work / "tok", shards, PackConfig(split="tail", val_fraction=0.1, workers=1), progress=False)
    return shards


def lmforge_run(shards: str, out: str, model: dict, train: dict) -> dict:
    import torch
    import yaml

    from lmforge.train.config import TrainConfig
    from lmforge.train.metrics import read_metrics
    from lmforge.train.pretrain import pretrain

    torch.set_num_threads(2)
    model_file = Path(out + ".model.yaml")
    model_file.write_text(yaml.safe_dump({"preset": "tiny", **model}))
    s = pretrain(shards, str(model_file), out, TrainConfig(**train), overwrite=True, progress=False, sample_prompts=())
    rows = read_metrics(Path(out) / "metrics.csv")
    tokens = train["batch_size"] * train["block_size"]
    ms = [1000 * tokens / float(r["tokens_per_s"]) for r in rows if r["tokens_per_s"] and int(r["step"]) > 20]
    vals = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    return {"ms_per_iter": statistics.median(ms), "val_loss_final": vals[-1][1], "val_steps": vals,
            "mfu_median": statistics.median(float(r["mfu"]) for r in rows if r["mfu"] and int(r["step"]) > 20),
            "params": s["params"]}


def nanogpt_peer_model(vocab_size: int, n_layer: int = NANOGPT_MODEL["n_layer"], n_head: int = NANOGPT_MODEL["n_head"],
                       n_embd: int = NANOGPT_MODEL["n_embd"], block_size: int = NANOGPT_MODEL["block_size"]):
    """nanoGPT's model.py as its train.py builds it for the CPU configuration (bias=False,
    dropout 0), rewritten here because the benchmark machine cannot download it: LayerNorm
    without bias, one c_attn projection split into q/k/v, SDPA with is_causal, exact GELU MLP
    4x wide, tied lm_head, normal(0.02) init with the residual projections scaled by
    1/sqrt(2 n_layer), loss over all positions."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class LayerNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = LayerNorm(n_embd), LayerNorm(n_embd)
            self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
            self.attn_proj = nn.Linear(n_embd, n_embd, bias=False)
            self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
            self.gelu = nn.GELU()
            self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(n_embd, dim=2)
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
            return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))

    class NanoGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
            self.wte.weight = self.lm_head.weight
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, 0.0, 0.02)
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, 0.0, 0.02 / (2 * n_layer) ** 0.5)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], dtype=torch.long))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    return NanoGPT()


def nanogpt_peer_run(shards: str, steps: int, compile: bool = False) -> dict:
    """The per-step work of nanoGPT's train.py on a CPU (its choices: a fresh np.memmap and
    torch.stack per batch, AdamW without fused or foreach kernels, clip_grad_norm_, loss.item()
    every step for log_interval=1) on nanoGPT's own model."""
    import math

    import numpy as np
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(NANOGPT_TRAIN["seed"])
    meta = json.loads((Path(shards) / "meta.json").read_text())
    train_file = Path(shards) / meta["splits"]["train"]["shards"][0]["file"]
    model = nanogpt_peer_model(meta["vocab_size"])
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": NANOGPT_TRAIN["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    cfg = NANOGPT_TRAIN
    decay_steps = cfg["max_steps"] - cfg["warmup_steps"]
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, cfg["beta2"]))
    B, T = cfg["batch_size"], cfg["block_size"]

    def get_batch():
        data = np.memmap(train_file, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    forward = torch.compile(model) if compile else model  # train.py's --compile=True
    times = []
    x, y = get_batch()
    for it in range(steps):
        t = time.perf_counter()
        # nanoGPT's get_lr: linear warmup, then cosine from lr to min_lr at max_steps
        lr = (cfg["lr"] * (it + 1) / cfg["warmup_steps"] if it < cfg["warmup_steps"] else
              cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * (it - cfg["warmup_steps"]) / decay_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        _, loss = forward(x, y)
        x, y = get_batch()  # train.py fetches the next batch while the forward's graph is alive
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t)
    return {"ms_per_iter": 1000 * statistics.median(times[20:])}


def summarize(results: list[dict]) -> dict:
    out = {"ms_per_iter": round(statistics.median(r["ms_per_iter"] for r in results), 2),
           "runs_ms_per_iter": [round(r["ms_per_iter"], 2) for r in results],
           "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}
    out["tokens_per_s"] = round(12 * 64 / out["ms_per_iter"] * 1000, 1)
    for key in ("val_loss_final", "mfu_median", "params"):
        if key in results[0]:
            out[key] = results[0][key] if key == "params" else round(statistics.median(r[key] for r in results), 4)
    if "val_steps" in results[0]:
        out["val_steps_run1"] = results[0]["val_steps"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data", type=Path, default=SHAKESPEARE)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="configurations to skip")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmforge-bench-train-"))
    shards = str(prepare(work, args.data))
    call = "import json, bench_train as b; print(json.dumps(b.{}))"
    configs = {
        "lmforge": call.format(f"lmforge_run({shards!r}, {str(work / 'run-eager')!r}, b.NANOGPT_MODEL, b.NANOGPT_TRAIN)"),
        "lmforge_compile": call.format(f"lmforge_run({shards!r}, {str(work / 'run-compile')!r}, b.NANOGPT_MODEL, {{**b.NANOGPT_TRAIN, 'compile': True}})"),
        "nanogpt_peer": call.format(f"nanogpt_peer_run({shards!r}, 400)"),
        "nanogpt_peer_compile": call.format(f"nanogpt_peer_run({shards!r}, 400, compile=True)"),
    }
    configs = {name: code for name, code in configs.items() if name not in args.skip}
    # Interleaved rounds (A B C, A B C, ...): a neighbour slowing the machine for a while hits
    # every configuration alike instead of one of them.
    raw: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(args.runs):
        for name, code in configs.items():
            raw[name].append(run_measured(code, env={"OMP_NUM_THREADS": "2"}))
    result = {name: summarize(rs) for name, rs in raw.items()}
    # tokens/s ours / tokens/s nanoGPT's, each mode against the same mode (the target: >= 1.2)
    for ours, peer in (("lmforge", "nanogpt_peer"), ("lmforge_compile", "nanogpt_peer_compile")):
        if ours in result and peer in result:
            result[f"speedup_{ours}_vs_{peer}"] = round(result[peer]["ms_per_iter"] / result[ours]["ms_per_iter"], 3)
    ten_m = call.format(f"lmforge_run({shards!r}, {str(work / 'run-10m')!r}, b.TEN_M_MODEL, "
                        "{**b.NANOGPT_TRAIN, 'max_steps': 60, 'warmup_steps': 10, 'batch_size': 8, 'block_size': 256, 'eval_every': 0, 'eval_batches': 1})")
    r = run_measured(ten_m, env={"OMP_NUM_THREADS": "2"})
    result["mfu_10m"] = {"params": r["params"], "mfu_median": round(r["mfu_median"], 4),
                         "tokens_per_s": round(8 * 256 / r["ms_per_iter"] * 1000, 1), "peak_rss_mb": r["peak_rss_mb"]}
    result["nanogpt_reference"] = {"note": "quoted from the issue: nanoGPT train.py, torch 2.13 CPU, 2 threads, median of 3",
                                   "ms_per_iter": 37.9, "ms_per_iter_compile": 34.6, "val_loss_2000": 1.8857}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
