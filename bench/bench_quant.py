"""Few-row products on quantized weights (lmforge.quant.kernels) against the fp32 decode kernel
(lmforge.generate.kernels.few_row_linear), on SmolLM2-135M's matrix shapes.

For each shape [out, in] (576x576: q/o projections, 1536x576: gate/up, 576x1536: down,
49152x576: the tied head) and each of fp32, q8_0, q4_0, q4_1: the time of one product with 1
and with 8 rows (median of --runs, each the mean of --reps calls), and the implied GB/s of
weight bytes read. Quantized formats are timed both ways: fp32 activations (`linear`) and int8
activations per block (`linear_q8`). Random weights: the time does not depend on the values.

    .venv/bin/python bench/bench_quant.py --runs 7 > bench/results/quant.json
    .venv/bin/python bench/bench_quant.py --cpu haswell   # numba code for AVX2 only (no AVX-512)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]
FORMATS = ["q8_0", "q4_0", "q4_1"]


def timed(fn, x, w, runs: int, reps: int) -> float:
    """Median over runs of the mean seconds per call."""
    fn(x, w)  # compile / load, warm the caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(reps):
            fn(x, w)
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="calls per run (the head: a fifth as many, at least 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu", default=None, help="numba's target CPU (NUMBA_CPU_NAME), e.g. haswell for AVX2 only")
    args = ap.parse_args()
    if args.cpu:
        os.environ["NUMBA_CPU_NAME"] = args.cpu  # read when numba is imported, below
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numba
    import numpy as np

    from lmforge.generate.kernels import few_row_linear, set_threads
    from lmforge.quant import quantize
    from lmforge.quant.kernels import linear, linear_q8

    set_threads(args.threads)
    rng = np.random.default_rng(0)
    results = []
    for n_out, k_in in SHAPES:
        w32 = (rng.standard_normal((n_out, k_in)) * 0.05).astype(np.float32)
        reps = args.reps if n_out < 10000 else max(1, args.reps // 5)
        variants = [("fp32", "fp32", few_row_linear, w32, w32.nbytes)]
        for fmt in FORMATS:
            q = quantize(w32, fmt)
            variants += [(fmt, "f32_act", linear, q, q.nbytes), (fmt, "q8_act", linear_q8, q, q.nbytes)]
        for fmt, act, fn, w, nbytes in variants:
            row = {"shape": [n_out, k_in], "format": fmt, "activations": act, "weight_mb": round(nbytes / 1e6, 3)}
            for rows in (1, 8):
                x = rng.standard_normal((rows, k_in)).astype(np.float32)
                sec = timed(fn, x, w, args.runs, reps)
                row[f"ms_{rows}row"] = round(sec * 1e3, 4)
                row[f"gb_s_{rows}row"] = round(nbytes / sec / 1e9, 2)
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(json.dumps({
        "bench": "quant_kernels",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "numba_cpu": os.environ.get("NUMBA_CPU_NAME", "host"), "threads": numba.get_num_threads(),
                    "load_average": load},
        "runs": args.runs, "reps": args.reps,
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
