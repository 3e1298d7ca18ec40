"""Translation speed: lmforge's Engine against transformers' `generate` on an encoder-decoder.

The same random weights (the transformer-base preset by default, 6+6 layers, 512 wide, a 37k
vocabulary, 64 M parameters; another with --preset, e.g. seq2seq-tiny) as an lmforge model dir
and, exported with lmforge.interop.hf_seq2seq, as MBartForConditionalGeneration. The same batch of
--sentences source sentences (random token ids of 8..40 tokens, right-padded with an attention
mask on transformers' side, as the Engine pads them), the same --max-new-tokens, beam search with
4 beams (length_penalty 1, early_stopping False) and greedy, fp32, --threads torch threads on both
sides (torch.set_num_threads and OMP_NUM_THREADS).

Equal work: the model has no end token on either side (no eos in the config, none given to
generate, the Engine's tokenizer names none), so every hypothesis runs to max_new_tokens on both
sides: the two do the same number of decoder steps over the same rows. The outputs are compared
too ("same_outputs": the share of sentences whose best sequence is the same ids on both sides;
random weights leave near-ties that float rounding may break differently, so this is reported,
not required).

Figures, each the median of --runs runs, every run a fresh process per system, interleaved:
sentences/s (the batch / the time of one generate call after a warm-up call), target tokens/s,
peak RSS of the process.

    .venv/bin/python bench/bench_translate.py --runs 3 > bench/results/translate.json
    .venv/bin/python bench/bench_translate.py --runs 3 --preset seq2seq-tiny
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

START_ID = 2  # the decoder start token (there is no tokenizer: ids in, ids out)


def build(work: Path, preset: str) -> tuple[Path, Path]:
    """An lmforge model dir and an mBART dir holding the same random weights (dropout off)."""
    import torch

    from lmforge.interop.hf_seq2seq import save_hf_dir
    from lmforge.model.config import get_preset
    from lmforge.model.io import load_model_dir, save_model_dir
    from lmforge.model.seq2seq import Seq2Seq

    ours, hf = work / f"lmforge-{preset}", work / f"hf-{preset}"
    if not ours.exists():
        torch.manual_seed(0)
        model = Seq2Seq(get_preset(preset).replace(dropout=0.0))
        with torch.no_grad():  # norms at 1 and biases at 0 would be an unusually easy model
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_model_dir(model, ours)
    if not hf.exists():
        model, cfg = load_model_dir(ours)
        save_hf_dir(model, cfg, hf, decoder_start_token_id=START_ID)
    return ours, hf


def sources(n: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(n)
    lengths = torch.randint(8, 41, (n,), generator=g).tolist()
    return [torch.randint(10, vocab - 10, (L,), generator=g).tolist() for L in lengths]


def run_lmforge(model_dir: str, n: int, new_tokens: int, threads: int) -> dict:
    import torch

    from lmforge.generate.engine import Engine
    from lmforge.generate.params import SamplingParams
    from lmforge.model.io import load_model_dir

    torch.set_num_threads(threads)
    model, cfg = load_model_dir(model_dir)

    class NoTokenizer:  # ids in, ids out; no end token, so every hypothesis runs to max_new_tokens
        eos_id = bos_id = pad_id = None
        hf = type("H", (), {"token_to_id": staticmethod(lambda t: None)})()

        def decode(self, ids):
            return ""

    engine = Engine(model, NoTokenizer(), decoder_start_id=START_ID)
    src = sources(n, cfg.vocab_size)

    def timed(num_beams: int, tokens: int):
        params = SamplingParams(max_new_tokens=tokens, temperature=0.0, num_beams=num_beams)
        start = time.perf_counter()
        out = engine.generate_ids(src, params)
        return time.perf_counter() - start, [c.ids for c in out]

    return _measure(timed, n, new_tokens)


def run_transformers(hf_dir: str, n: int, new_tokens: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    src = sources(n, model.config.vocab_size)
    S = max(map(len, src))
    ids = torch.zeros((n, S), dtype=torch.long)
    mask = torch.zeros((n, S), dtype=torch.long)
    for i, s in enumerate(src):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1

    def timed(num_beams: int, tokens: int):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, num_beams=num_beams,
                                 length_penalty=1.0, early_stopping=False, eos_token_id=None, pad_token_id=0,
                                 decoder_start_token_id=START_ID, use_cache=True)
        return time.perf_counter() - start, [row[1:] for row in out.tolist()]

    return _measure(timed, n, new_tokens)


def _measure(timed, n: int, new_tokens: int) -> dict:
    out: dict = {}
    for name, beams in (("beam4", 4), ("greedy", 1)):
        timed(beams, 4)  # warm up allocators and kernels
        seconds, ids = timed(beams, new_tokens)
        out[f"{name}_s"] = seconds
        out[f"{name}_sentences_per_s"] = n / seconds
        out[f"{name}_target_tokens_per_s"] = sum(map(len, ids)) / seconds
        out[f"{name}_ids"] = ids
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--preset", default="transformer-base", help="an encoder-decoder preset (transformer-base, seq2seq-tiny)")
    ap.add_argument("--sentences", type=int, default=16, help="source sentences, translated as one batch")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep the model dirs here (default: a temp dir)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmforge-bench-translate-"))
    ours, hf = build(work, args.preset)
    call = f"{args.sentences}, {args.max_new_tokens}, {args.threads}"
    codes = {
        "lmforge": f"import json, bench_translate as b; print(json.dumps(b.run_lmforge({str(ours)!r}, {call})))",
        "transformers": f"import json, bench_translate as b; print(json.dumps(b.run_transformers({str(hf)!r}, {call})))",
    }
    env = {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": f"{Path(__file__).resolve().parent}{os.pathsep}"
           f"{Path(__file__).resolve().parents[1]}"}
    raw: dict = {k: [] for k in codes}
    for _ in range(args.runs):  # interleaved: a noisy neighbour slows both alike
        for name, code in codes.items():
            raw[name].append(run_measured(code, env=env))
            print(f"{name}: beam4 {raw[name][-1]['beam4_sentences_per_s']:.2f} sentences/s", file=sys.stderr)
    result: dict = {}
    for name, runs in raw.items():
        keys = [k for k in runs[0] if not k.endswith("_ids")]
        result[name] = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
        result[name]["runs_beam4_sentences_per_s"] = [round(r["beam4_sentences_per_s"], 3) for r in runs]
    same = {}
    for mode in ("beam4", "greedy"):
        a, b = raw["lmforge"][0][f"{mode}_ids"], raw["transformers"][0][f"{mode}_ids"]
        same[mode] = round(sum(x == y for x, y in zip(a, b)) / len(a), 3)
    from lmforge.model.config import get_preset

    cfg = get_preset(args.preset)
    result["summary"] = {
        "beam4_speedup": round(result["lmforge"]["beam4_sentences_per_s"] / result["transformers"]["beam4_sentences_per_s"], 3),
        "greedy_speedup": round(result["lmforge"]["greedy_sentences_per_s"] / result["transformers"]["greedy_sentences_per_s"], 3),
        "target_beam4_speedup": 1.5,
        "same_outputs": same,
        "peak_rss_vs_transformers": round(result["lmforge"]["peak_rss_mb"] / result["transformers"]["peak_rss_mb"], 3),
    }
    result["settings"] = {"preset": args.preset, "layers": f"{cfg.n_encoder_layer}+{cfg.n_layer}", "n_embd": cfg.n_embd,
                          "vocab_size": cfg.vocab_size, "sentences": args.sentences, "source_tokens": "8..40",
                          "max_new_tokens": args.max_new_tokens, "threads": args.threads, "runs": args.runs,
                          "equal_lengths": "no end token on either side: every hypothesis runs to max_new_tokens"}
    import torch
    import transformers

    from lmforge.model.cpu_matmul import cpu_matmul_backend

    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                         "torch": torch.__version__, "transformers": transformers.__version__,
                         "load_average_end": os.getloadavg(),
                         # lmforge's fp32 CPU products (lmforge.model.cpu_matmul); transformers' are torch's
                         "lmforge_cpu_matmul": cpu_matmul_backend()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
