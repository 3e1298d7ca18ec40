"""`lmforge estimate` against measurements on this machine: predicted vs measured training
tokens/s and peak memory for the presets and SmolLM2, and decode tokens/s for SmolLM2-135M-Instruct
in its shipped q4_1 blocks and in fp32.

Each case runs `lmforge estimate ... --measure --json` in a fresh process (so the peak RSS is the
case's own): the prediction and the measurement come from the same process, minutes apart at most.
Memory is compared as the process's peak RSS over its RSS before the model was built (the runtime:
Python, torch, lmforge) against the predicted peak (`speed.training_estimate`'s "peak": the
estimate's total plus the backward's transients); speed as tokens/s. Median of --runs runs.

    .venv/bin/python bench/bench_estimate.py [--runs 3] [--cases tiny,llama-tiny,...] > bench/results/estimate.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchutil import REPO

# (name, model, batch, seq, inference weights or None): training cases at sizes that fit in 24 GB
# and take seconds a step; decode cases load the registry's SmolLM2.
CASES = {
    "tiny": ("tiny", 16, 256, None),
    "tiny-b4": ("tiny", 4, 128, None),
    "llama-tiny": ("llama-tiny", 4, 256, None),
    "gpt2-124m": ("gpt2-124m", 2, 256, None),
    "smollm2-135m": ("smollm2-135m", 1, 256, None),
    "smollm2-decode-q4_1": ("smollm2-135m-instruct", 1, 64, "q4_1"),  # speed: decode tokens/s
    "smollm2-decode-fp32": ("smollm2-135m-instruct", 1, 64, "fp32"),
}


def run_case(model: str, batch: int, seq: int, weights: str | None, home: str) -> dict:
    cmd = [str(REPO / ".venv/bin/lmforge"), "estimate", "--model", model, "--batch-size", str(batch),
           "--seq-len", str(seq), "--measure", "--json"]
    if weights:
        cmd += ["--inference", "--weights", weights, "--context", "128"]
    env = {**os.environ, "LMFORGE_HOME": home}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def compare(result: dict, weights: str | None) -> dict:
    """Predicted against measured, for training or (weights given) decoding."""
    if weights:
        d, inf = result["measured"]["decode"], result["inference"]
        row = {"speed_predicted": inf["decode_tokens_per_s"], "speed_measured": d["tokens_per_s"],
               "memory_predicted_bytes": inf["memory_bytes"],
               "memory_measured_bytes": d["peak_rss_bytes"] - d["baseline_rss_bytes"],
               "runtime_rss_bytes": d["baseline_rss_bytes"]}
    else:
        m, train = result["measured"]["train"], result["train"]
        row = {"speed_predicted": train["tokens_per_s"], "speed_measured": m["tokens_per_s"],
               "memory_predicted_bytes": train["peak"],
               "memory_measured_bytes": m["peak_rss_bytes"] - m["baseline_rss_bytes"],
               "runtime_rss_bytes": m["baseline_rss_bytes"]}
    row["speed_ratio"] = row["speed_predicted"] / row["speed_measured"]
    row["memory_ratio"] = row["memory_predicted_bytes"] / row["memory_measured_bytes"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--home", default=os.environ.get("LMFORGE_HOME", ""),
                    help="LMFORGE_HOME holding the imported SmolLM2 (decode cases); measurements are recorded there")
    args = ap.parse_args()
    home = args.home or tempfile.mkdtemp(prefix="bench-estimate-")
    results = {}
    for name in args.cases.split(","):
        model, batch, seq, weights = CASES[name]
        rows = []
        for r in range(args.runs):
            print(f"[{name}] run {r + 1}/{args.runs}", file=sys.stderr, flush=True)
            rows.append(compare(run_case(model, batch, seq, weights, home), weights))
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        results[name] = {"model": model, "batch_size": batch, "seq_len": seq, "weights": weights,
                         "median": med, "runs": rows}
        ratios = {k: round(v, 2) for k, v in med.items() if k.endswith("ratio")}
        print(f"[{name}] predicted/measured: {ratios}", file=sys.stderr, flush=True)
    print(json.dumps({"bench": "estimate", "runs": args.runs, "load_average": os.getloadavg(),
                      "cases": results}, indent=1))


if __name__ == "__main__":
    main()
