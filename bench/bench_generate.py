"""Generation speed: lmforge's Engine against transformers' `generate` on the same weights.

SmolLM2-135M (the real weights with --weights smollm2, else the exact shape with random weights),
fp32, greedy, KV cache on both sides, 2 threads. Figures, each the median of --runs runs in a
fresh process per system (interleaved):
  - time to first token (32-token prompt), batch 1 and batch 8
  - decode tokens/s over 128 new tokens (after the first), batch 1 and batch 8 (aggregate)
  - prefill tokens/s on a 512-token prompt
plus the bandwidth bound (fp32 weights streamed once per decoded token, at the matrix-vector
GB/s this machine reaches) and peak RSS.

    .venv/bin/python bench/bench_generate.py --runs 3 > bench/results/generate.json
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

from benchutil import run_measured

NEW_TOKENS = 128
PROMPT = 32
PREFILL = 512


def build(work: Path, weights: str) -> tuple[Path, Path]:
    """An lmforge model dir and an HF dir holding the same weights."""
    import torch

    from lmforge.interop.hf import save_hf_dir
    from lmforge.model.config import get_preset
    from lmforge.model.gpt import GPT
    from lmforge.model.io import load_model_dir, save_model_dir

    ours, hf = work / "lmforge", work / "hf"
    if not ours.exists():
        if weights == "smollm2":
            from lmforge.interop.registry import load_model

            loaded = load_model("smollm2-135m-instruct")
            model = loaded.model
        else:
            torch.manual_seed(0)
            model = GPT(get_preset("smollm2-135m"))
        save_model_dir(model, ours)
    if not hf.exists():
        model, cfg = load_model_dir(ours)
        save_hf_dir(model, cfg, hf)
    return ours, hf


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def run_lmforge(model_dir: str) -> dict:
    import torch

    from lmforge.generate.engine import Engine
    from lmforge.generate.sampling import SamplingParams
    from lmforge.model.io import load_model_dir

    torch.set_num_threads(2)
    model, cfg = load_model_dir(model_dir)

    class NoTokenizer:  # ids in, ids out: tokenization is not what is measured
        eos_id = None
        hf = type("H", (), {"token_to_id": staticmethod(lambda t: None)})()

        def decode(self, ids):
            return ""

    engine = Engine(model, NoTokenizer())

    def timed(prompts, n):  # exactly n tokens per row, as transformers' min_new_tokens=n below
        start = time.perf_counter()
        engine.generate_ids(prompts, SamplingParams(max_new_tokens=n, temperature=0.0, top_k=0, ignore_eos=True))
        return time.perf_counter() - start

    return _measure(timed, cfg.vocab_size)


def run_transformers(hf_dir: str) -> dict:
    import torch
    import transformers

    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def timed(prompts, n):
        ids = torch.tensor(prompts)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=0)
        return time.perf_counter() - start

    return _measure(timed, model.config.vocab_size)


def _measure(timed, vocab: int) -> dict:
    b1, b8, long = _prompts(1, PROMPT, vocab), _prompts(8, PROMPT, vocab), _prompts(1, PREFILL, vocab)
    timed(b1, 8)  # warm up allocators and kernels
    out = {}
    for name, prompts in (("b1", b1), ("b8", b8)):
        ttft = statistics.median(timed(prompts, 1) for _ in range(3))
        total = timed(prompts, NEW_TOKENS)
        out[f"ttft_ms_{name}"] = 1000 * ttft
        out[f"decode_tokens_per_s_{name}"] = len(prompts) * (NEW_TOKENS - 1) / (total - ttft)
    prefill = statistics.median(timed(long, 1) for _ in range(2))
    out["prefill_tokens_per_s_512"] = PREFILL / prefill
    return out


def bandwidth() -> dict:
    """GB/s of an fp32 matrix-vector product far larger than the caches (torch and numpy)."""
    import torch

    torch.set_num_threads(2)
    w = torch.randn(8192, 8192)
    x = torch.randn(8192)
    wn, xn = w.numpy(), x.numpy()
    best = {"torch": float("inf"), "numpy": float("inf")}
    for _ in range(5):
        t = time.perf_counter()
        torch.mv(w, x)
        best["torch"] = min(best["torch"], time.perf_counter() - t)
        t = time.perf_counter()
        wn @ xn
        best["numpy"] = min(best["numpy"], time.perf_counter() - t)
    return {k: w.numel() * 4 / v / 1e9 for k, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights", choices=["random", "smollm2"], default="random")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmforge-bench-gen-"))
    ours, hf = build(work, args.weights)
    codes = {
        "lmforge": f"import json, bench_generate as b; print(json.dumps(b.run_lmforge({str(ours)!r})))",
        "transformers": f"import json, bench_generate as b; print(json.dumps(b.run_transformers({str(hf)!r})))",
    }
    raw = {k: [] for k in codes}
    for _ in range(args.runs):
        for name, code in codes.items():
            raw[name].append(run_measured(code, env={"OMP_NUM_THREADS": "2"}))
    result = {}
    for name, runs in raw.items():
        result[name] = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
        result[name]["runs_decode_tokens_per_s_b1"] = [round(r["decode_tokens_per_s_b1"], 2) for r in runs]
    bw = run_measured("import json, bench_generate as b; print(json.dumps(b.bandwidth()))")
    from lmforge.model.config import get_preset
    from lmforge.model.estimate import estimate_memory

    weight_bytes = estimate_memory(get_preset("smollm2-135m"), 1, 1)["weights"]
    bound = max(bw["torch"], bw["numpy"]) * 1e9 / weight_bytes
    ours_b1, theirs_b1 = result["lmforge"]["decode_tokens_per_s_b1"], result["transformers"]["decode_tokens_per_s_b1"]
    result["summary"] = {
        "decode_speedup_b1": round(ours_b1 / theirs_b1, 3),
        "prefill_speedup": round(result["lmforge"]["prefill_tokens_per_s_512"] / result["transformers"]["prefill_tokens_per_s_512"], 3),
        "b8_over_b1_aggregate": round(result["lmforge"]["decode_tokens_per_s_b8"] / ours_b1, 3),
        "matvec_gb_per_s": {k: round(v, 2) for k, v in bw.items()},
        "bandwidth_bound_tokens_per_s": round(bound, 2),
        "fraction_of_bound_b1": round(ours_b1 / bound, 3),
        "weights": args.weights,
        "weight_mb": round(weight_bytes / 1e6, 1),
    }
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
