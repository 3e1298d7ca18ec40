"""Few-row products on quantized weights (lmforge.quant.kernels) against the fp32 decode kernel
(lmforge.generate.kernels.few_row_linear), on SmolLM2-135M's matrix shapes.

Two measures, each the median of --runs runs:
- per shape [out, in] (960x576: fused q|k|v, 576x576: o, 3072x576: gate|up, 576x1536: down,
  49152x576: the tied head) and format (fp32, q8_0, q4_0, q4_1): the time of one product with 1
  and with 8 rows, repeated on the same matrix (so the smaller ones run from cache: kernel
  throughput, G weights/s); 8 rows with int8 activations (`int8_linear`, where the CPU has
  AVX2/VNNI); 512 rows (a prefill's: the tiled many-row kernel, or torch's BLAS for fp32);
- per model (fp32; q8_0; q4_1 with a q8_0 head, as the shipped SmolLM2 GGUF): every product of one
  decode step, 30 layers of distinct matrices plus the head (streamed from memory: GB/s of weight
  bytes, the bound of a decoded token), at 1 and 8 rows (and 8 with int8 activations).
Random blocks: the time does not depend on the values.

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

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
LAYER = SHAPES[:4]
LAYERS = 30
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


def random_packed(fmt: str, rows: int, cols: int, rng):
    from lmforge.quant.formats import FORMATS as F, QuantTensor
    from lmforge.quant.packed import pack
    import numpy as np

    f = F[fmt]
    b = rng.integers(0, 256, (rows, cols // 32, f.block_bytes), dtype=np.uint8)
    scale = np.full((rows, cols // 32, 2 if f.has_min else 1), 0.01, "<f2").view(np.uint8)
    b[..., : scale.shape[-1]] = scale
    return pack(QuantTensor(f, (rows, cols), b.reshape(rows, -1)))


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

    import torch

    from lmforge.generate.kernels import few_row_linear
    from lmforge.quant.kernels import INT8, int8_linear, many_row_linear
    from lmforge.quant.kernels import few_row_linear as quant_linear

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    def fp32_prefill(x, w):  # what an fp32 model's prefill runs: torch's BLAS
        return torch.from_numpy(x) @ torch.from_numpy(w).T
    rng = np.random.default_rng(0)
    results = []
    for n_out, k_in in SHAPES:
        w32 = (rng.standard_normal((n_out, k_in)) * 0.05).astype(np.float32)
        reps = args.reps if n_out < 10000 else max(1, args.reps // 5)
        variants = [("fp32", few_row_linear, w32, w32.nbytes)]
        for fmt in FORMATS:
            q = random_packed(fmt, n_out, k_in, rng)
            variants.append((fmt, quant_linear, q, q.nbytes))
        for fmt, fn, w, nbytes in variants:
            row = {"shape": [n_out, k_in], "format": fmt, "weight_mb": round(nbytes / 1e6, 3)}
            for rows in (1, 8):
                x = rng.standard_normal((rows, k_in)).astype(np.float32)
                sec = timed(fn, x, w, args.runs, reps)
                row[f"ms_{rows}row"] = round(sec * 1e3, 4)
                row[f"gweights_s_{rows}row"] = round(n_out * k_in / sec / 1e9, 2)
            if fmt != "fp32" and INT8:  # int8 activations (--int8-activations)
                sec = timed(int8_linear, rng.standard_normal((8, k_in)).astype(np.float32), w, args.runs, reps)
                row["ms_8row_int8"] = round(sec * 1e3, 4)
                row["gweights_s_8row_int8"] = round(n_out * k_in / sec / 1e9, 2)
            x = rng.standard_normal((512, k_in)).astype(np.float32)  # a 512-token prefill's rows
            sec = timed(fp32_prefill if fmt == "fp32" else many_row_linear, x, w, max(1, args.runs // 2), 1)
            row["ms_512row"] = round(sec * 1e3, 3)
            row["gmacs_s_512row"] = round(512 * n_out * k_in / sec / 1e9, 1)
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    models = []
    for name, layer_fmt, head_fmt in (("fp32", "fp32", "fp32"), ("q8_0", "q8_0", "q8_0"), ("q4_1 + q8_0 head", "q4_1", "q8_0")):
        def weight(fmt, n, k):
            if fmt == "fp32":
                return few_row_linear, (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
            return quant_linear, random_packed(fmt, n, k, rng)

        mats = [weight(layer_fmt, n, k) for _ in range(LAYERS) for n, k in LAYER] + [weight(head_fmt, *SHAPES[-1])]
        nbytes = sum(w.nbytes for _, w in mats)
        row = {"model": name, "weight_mb": round(nbytes / 1e6, 1)}
        for rows, int8 in ((1, False), (8, False), (8, True)):
            if int8 and (layer_fmt == "fp32" or not INT8):
                continue
            xs = {k: rng.standard_normal((rows, k)).astype(np.float32) for k in (576, 1536)}

            def step():
                for fn, w in mats:
                    (int8_linear if int8 else fn)(xs[w.shape[1]], w)

            step()
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            sec = statistics.median(times)
            tag = f"{rows}row" + ("_int8" if int8 else "")
            row[f"ms_{tag}"] = round(sec * 1e3, 3)
            row[f"gb_s_{tag}"] = round(nbytes / sec / 1e9, 2)
        models.append(row)
        print(json.dumps(row), file=sys.stderr)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(json.dumps({
        "bench": "quant_kernels",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "numba_cpu": os.environ.get("NUMBA_CPU_NAME", "host"), "int8": INT8,
                    "threads": numba.get_num_threads(),
                    "load_average": load},
        "runs": args.runs, "reps": args.reps,
        "results": results,
        "decode_step_products": models,
    }, indent=1))


if __name__ == "__main__":
    main()
