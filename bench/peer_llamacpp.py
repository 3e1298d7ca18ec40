"""llama.cpp as a generation peer, driven through llama-cpp-python's low-level calls.

Runs under the peer's own venv (see bench/setup_llamacpp.sh), never under lmforge's: it imports
neither lmforge nor torch. Prints one JSON object on stdout.

    /work/peer/llama-venv/bin/python bench/peer_llamacpp.py MODEL.gguf --threads 2 \
        --new-tokens 128 --prompt-tokens 32 --prefill 512 --runs 3 [--prompt-ids ids.json]

What is measured (batch 1, greedy, `n_ctx` 2048, `n_batch` 512, mmap as llama.cpp's default):
  - load_s: `Llama(model_path=...)` construction;
  - ttft_s: `reset()`, `eval(prompt)` (one llama_decode of the whole prompt), argmax of its logits;
  - decode_tok_s: then exactly --new-tokens further tokens, each one `eval([tok])` (one
    llama_decode of one token) followed by the argmax of the logits llama.cpp returned; EOS is
    ignored, so every run decodes the same count. Only this loop is timed;
  - prefill_tok_s: `reset()`, `eval(ids)` for a --prefill-token prompt (one llama_decode, since
    n_batch = 512 covers it);
  - rss: VmRSS after load, and the process's peak (`ru_maxrss`) at the end, both in MiB;
  - generated_ids: the first token (from the prompt) then the --new-tokens decoded ones.
With --threads equal to the core count, llama.cpp's threads spin at each barrier: any other busy
process on the machine slows decode many-fold (seen here: 142 tok/s quiet, 4-30 tok/s next to a
test run), far beyond a fair share, so time it on a quiet machine and check loadavg_start/_end and
the per-run lists.
One untimed warm-up (prompt + a few decode steps) precedes the timed runs; each figure is the
median over --runs repetitions in this process, the per-run values are listed too.

With --requantize OUT.gguf the script instead runs llama.cpp's own quantizer
(`llama_model_quantize`, `allow_requantize` on) from GGUF to OUT as --ftype (default q8_0), prints
a JSON line about it, and exits; e.g. a Q8_0 file for the peer made from the Q4_1 one. Weights
requantized from Q4_1 carry Q4_1's rounding: the Q8_0 file has Q8_0's layout and speed, not the
accuracy of a Q8_0 made from the original weights.

The argmax reads llama.cpp's logits buffer in place (no copy into `Llama.scores`): the high-level
sampler chain and completion API are bypassed so that the loop is llama.cpp's decode plus a
49k-float argmax.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import sys
import time


def default_ids(n: int) -> list[int]:
    return [(i * 7919) % 1000 + 100 for i in range(1, n + 1)]


def vm_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def requantize(src: str, out: str, ftype: str, threads: int) -> None:
    import llama_cpp

    code = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype.upper(), None)
    if code is None:
        sys.exit(f"unknown --ftype {ftype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.allow_requantize = True
    params.nthread = threads
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize returned {rc}")
    print(json.dumps({"llama_cpp_version": llama_cpp.__version__, "source": os.path.abspath(src),
                      "output": os.path.abspath(out), "ftype": ftype, "ftype_code": code,
                      "allow_requantize": True, "bytes": os.path.getsize(out),
                      "seconds": round(time.perf_counter() - t, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128, help="decoded tokens after the first")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512, help="prompt length for the prefill measure")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--prompt-ids", help="JSON list of token ids for the decode prompt "
                    "(its first --prompt-tokens are used; default: a fixed deterministic list)")
    ap.add_argument("--prefill-ids", help="JSON list of token ids for the prefill prompt "
                    "(its first --prefill are used; default: a fixed deterministic list)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--requantize", metavar="OUT", help="write GGUF requantized to OUT and exit")
    ap.add_argument("--ftype", default="q8_0", help="llama.cpp file type for --requantize "
                    "(a LLAMA_FTYPE_MOSTLY_* suffix: q8_0, q4_0, q4_1, f16, ...)")
    args = ap.parse_args()
    if args.requantize:
        requantize(args.gguf, args.requantize, args.ftype, args.threads)
        return

    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    def read_ids(path: str | None, n: int) -> list[int]:
        if path is None:
            return default_ids(n)
        with open(path) as f:
            ids = [int(t) for t in json.load(f)]
        if len(ids) < n:
            sys.exit(f"{path} holds {len(ids)} ids, {n} needed")
        return ids[:n]

    prompt = read_ids(args.prompt_ids, args.prompt_tokens)
    long_prompt = read_ids(args.prefill_ids, args.prefill)
    if args.prompt_tokens + args.new_tokens + 1 > args.n_ctx or args.prefill > args.n_ctx:
        sys.exit("prompt + new tokens exceed n_ctx")
    if args.prefill > args.n_batch:
        print(f"note: --prefill {args.prefill} > n_batch {args.n_batch}: eval splits it", file=sys.stderr)

    loadavg_start = list(os.getloadavg())
    t0 = time.perf_counter()
    llm = Llama(model_path=args.gguf, n_ctx=args.n_ctx, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=args.n_batch, verbose=False)
    load_s = time.perf_counter() - t0
    rss_after_load = vm_rss_mib()
    peak_after_load = peak_rss_mib()

    n_vocab = llm.n_vocab()
    ctx = llm.ctx

    def next_token() -> int:
        # Only the batch's last position requests logits (logits_all=False), so output row -1
        # is the one; view llama.cpp's buffer without copying it.
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    def first_token() -> tuple[int, float]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        tok = next_token()
        return tok, time.perf_counter() - t

    def decode(tok: int, n: int) -> tuple[list[int], float]:
        out = []
        t = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
            tok = next_token()
            out.append(tok)
        return out, time.perf_counter() - t

    # warm-up: fault the mapped weights in, size the compute buffers
    tok, _ = first_token()
    decode(tok, 4)

    ttfts, decodes, prefills, generated = [], [], [], None
    for _ in range(args.runs):
        tok, ttft = first_token()
        ids, dt = decode(tok, args.new_tokens)
        ids = [tok] + ids
        if generated is None:
            generated = ids
        elif ids != generated:
            print("warning: greedy output differs between runs", file=sys.stderr)
        ttfts.append(ttft)
        decodes.append(args.new_tokens / dt)
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_prompt)
        prefills.append(args.prefill / (time.perf_counter() - t))

    text = llm.detokenize(generated).decode("utf-8", errors="replace")
    result = {
        "system": "llama.cpp (llama-cpp-python)",
        "llama_cpp_version": llama_cpp.__version__,
        "gguf": os.path.abspath(args.gguf),
        "gguf_bytes": os.path.getsize(args.gguf),
        "threads": args.threads,
        "n_ctx": args.n_ctx,
        "n_batch": args.n_batch,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "prefill_tokens": args.prefill,
        "runs": args.runs,
        "load_s": round(load_s, 4),
        "ttft_s": round(statistics.median(ttfts), 5),
        "decode_tok_s": round(statistics.median(decodes), 2),
        "prefill_tok_s": round(statistics.median(prefills), 2),
        "ttft_s_runs": [round(x, 5) for x in ttfts],
        "decode_tok_s_runs": [round(x, 2) for x in decodes],
        "prefill_tok_s_runs": [round(x, 2) for x in prefills],
        "rss_after_load_mb": round(rss_after_load, 1),
        "peak_rss_after_load_mb": round(peak_after_load, 1),
        "peak_rss_mb": round(peak_rss_mib(), 1),
        "rss_unit": "MiB (ru_maxrss KiB / 1024)",
        "prompt_ids": prompt,
        "generated_ids": generated,
        "generated_text": text,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "python": platform.python_version(),
        "loadavg_start": loadavg_start,
        "loadavg_end": list(os.getloadavg()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
