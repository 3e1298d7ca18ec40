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

With --gguf FILE (repeatable) it compares quantized decoding instead: lmforge on the file's blocks
(imported with `lmforge convert FILE DIR --to lmforge`, which keeps them) against llama.cpp itself
on the same file, through llama-cpp-python built by bench/setup_llamacpp.sh into its own venv
(--peer-python; bench/peer_llamacpp.py runs there). Same prompt ids, greedy, 2 threads, 128 new
tokens; plus lmforge's load time from the model dir, batch 8, the same with int8 activations
(`Engine(..., int8_activations=True)`), and the fp32 model's prefill for comparison. Time it on a quiet machine: llama.cpp's and numba's threads spin at barriers, and a
busy core slows both many-fold.

    bash bench/setup_llamacpp.sh /work/peer/llama-venv
    .venv/bin/python bench/bench_generate.py --runs 3 --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --gguf SmolLM2-135M-Instruct.Q8_0.gguf > bench/results/generate_quant.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
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


def run_lmforge(model_dir: str, int8_activations: bool = False) -> dict:
    import torch

    from lmforge.generate.engine import Engine
    from lmforge.generate.sampling import SamplingParams
    from lmforge.model.io import load_model_dir

    torch.set_num_threads(2)
    start = time.perf_counter()
    model, cfg = load_model_dir(model_dir)
    load_s = time.perf_counter() - start

    class NoTokenizer:  # ids in, ids out: tokenization is not what is measured
        eos_id = None
        hf = type("H", (), {"token_to_id": staticmethod(lambda t: None)})()

        def decode(self, ids):
            return ""

    engine = Engine(model, NoTokenizer(), int8_activations=int8_activations)

    def timed(prompts, n):  # exactly n tokens per row, as transformers' min_new_tokens=n below
        start = time.perf_counter()
        engine.generate_ids(prompts, SamplingParams(max_new_tokens=n, temperature=0.0, top_k=0, ignore_eos=True))
        return time.perf_counter() - start

    return {"load_s": load_s, **_measure(timed, cfg.vocab_size)}


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


def compare_quantized(args, work: Path) -> dict:
    """lmforge on each GGUF's blocks against llama.cpp on the file (module docstring)."""
    import subprocess

    from lmforge.model.io import read_model_config

    peer_script = str(Path(__file__).resolve().parent / "peer_llamacpp.py")
    out: dict = {"new_tokens": NEW_TOKENS, "threads": 2, "files": {}}
    for gguf_file in args.gguf:
        gguf_file = Path(gguf_file).resolve()
        ours = work / f"lmforge-{gguf_file.stem}"
        if not ours.exists():
            subprocess.run([sys.executable, "-m", "lmforge", "convert", str(gguf_file), str(ours), "--to", "lmforge"],
                           check=True, capture_output=True)
        vocab = read_model_config(ours)[0].vocab_size
        ids = work / "prompt_ids.json"
        ids.write_text(json.dumps(_prompts(1, PROMPT, vocab)[0]))
        long_ids = work / "prefill_ids.json"
        long_ids.write_text(json.dumps(_prompts(1, PREFILL, vocab)[0]))
        peer = [args.peer_python, peer_script, str(gguf_file), "--threads", "2", "--new-tokens", str(NEW_TOKENS - 1),
                "--prompt-tokens", str(PROMPT), "--prefill", str(PREFILL), "--runs", "3",
                "--prompt-ids", str(ids), "--prefill-ids", str(long_ids)]
        raw: dict = {"lmforge": [], "lmforge_int8": [], "llama.cpp": []}
        for _ in range(args.runs):  # interleaved, each in a fresh process
            for key, int8 in (("lmforge", False), ("lmforge_int8", True)):
                code = f"import json, bench_generate as b; print(json.dumps(b.run_lmforge({str(ours)!r}, {int8})))"
                raw[key].append(run_measured(code, env={"OMP_NUM_THREADS": "2"}))
            raw["llama.cpp"].append(run_measured("", argv=peer))
        ours_r, int8_r = ({k: round(statistics.median(r[k] for r in raw[key]), 3) for k in raw[key][0]}
                          for key in ("lmforge", "lmforge_int8"))
        ours_r["runs_decode_tokens_per_s_b1"] = [round(r["decode_tokens_per_s_b1"], 1) for r in raw["lmforge"]]
        int8_r["runs_decode_tokens_per_s_b1"] = [round(r["decode_tokens_per_s_b1"], 1) for r in raw["lmforge_int8"]]
        peer_keys = ("load_s", "ttft_s", "decode_tok_s", "prefill_tok_s", "peak_rss_mb")
        theirs = {k: round(statistics.median(r[k] for r in raw["llama.cpp"]), 3) for k in peer_keys}
        theirs["runs_decode_tok_s"] = [round(r["decode_tok_s"], 1) for r in raw["llama.cpp"]]
        theirs["llama_cpp_version"] = raw["llama.cpp"][0].get("llama_cpp_version")
        out["files"][gguf_file.name] = {
            "lmforge": ours_r, "lmforge_int8_activations": int8_r, "llama.cpp": theirs,
            "summary": {
                "int8_decode_b1_vs_llama_cpp": round(int8_r["decode_tokens_per_s_b1"] / theirs["decode_tok_s"], 3),
                "int8_b8_over_b1_aggregate": round(int8_r["decode_tokens_per_s_b8"] / int8_r["decode_tokens_per_s_b1"], 3),
                "decode_b1_vs_llama_cpp": round(ours_r["decode_tokens_per_s_b1"] / theirs["decode_tok_s"], 3),
                "b8_over_b1_aggregate": round(ours_r["decode_tokens_per_s_b8"] / ours_r["decode_tokens_per_s_b1"], 3),
                "peak_rss_vs_llama_cpp": round(ours_r["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
                "prefill_vs_llama_cpp": round(ours_r["prefill_tokens_per_s_512"] / theirs["prefill_tok_s"], 3),
            },
        }
        print(json.dumps(out["files"][gguf_file.name]), file=sys.stderr)
    # Today's fp32 path on the same weights, for the prefill comparison.
    fp32 = work / "lmforge-fp32"
    if not fp32.exists():
        subprocess.run([sys.executable, "-m", "lmforge", "convert", str(Path(args.gguf[0]).resolve()), str(fp32),
                        "--to", "lmforge", "--dtype", "fp32"], check=True, capture_output=True)
    runs = [run_measured(f"import json, bench_generate as b; print(json.dumps(b.run_lmforge({str(fp32)!r})))",
                         env={"OMP_NUM_THREADS": "2"}) for _ in range(args.runs)]
    out["lmforge_fp32"] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    out["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                      "load_average_end": os.getloadavg()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights", choices=["random", "smollm2"], default="random")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--gguf", action="append", default=[], help="compare quantized decoding on this GGUF with llama.cpp")
    ap.add_argument("--peer-python", default="/work/peer/llama-venv/bin/python",
                    help="the interpreter of the venv bench/setup_llamacpp.sh built")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmforge-bench-gen-"))
    if args.gguf:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        print(json.dumps(compare_quantized(args, work), indent=2))
        return
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
