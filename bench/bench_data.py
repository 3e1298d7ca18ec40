"""Data-stage benchmark: clean, tokenizer training and packing throughput on the Python stdlib.

Prints one JSON object. Each figure is the median of --runs runs, each run in a fresh process
(so peak RSS is per stage). Peers in the same run: raw HF `tokenizers` training on the same
texts, and a single-process encode of the same text (`encode_batch`, and `encode_batch_fast`,
the offset-free call pack itself uses).

    .venv/bin/python bench/bench_data.py --runs 3 > bench/results/data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchutil import run_measured

STAGES = {}


def stage(fn):
    STAGES[fn.__name__] = fn
    return fn


def corpus_files() -> list[str]:
    from lmforge.data.embedded import stdlib_files

    return [str(p) for p in stdlib_files()]


@stage
def clean(work: Path) -> dict:
    from lmforge.data.clean import clean_corpus

    files = corpus_files()
    t = time.perf_counter()
    stats = clean_corpus(files, work / "clean-bench", overwrite=True, progress=False)
    return {"seconds": time.perf_counter() - t, "mb": stats["input"]["bytes_read"] / 1e6}


@stage
def clean_3x(work: Path) -> dict:
    """The same corpus three times over: peak memory must not triple (streaming)."""
    from lmforge.data.clean import clean_corpus

    big = work / "corpus3x"
    if not big.exists():
        for k in range(3):
            for f in corpus_files():
                dst = big / str(k) / Path(f).name.replace(".py", f"_{abs(hash(f)) % 10**8}.py")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
    t = time.perf_counter()
    stats = clean_corpus([big], work / "clean-3x", overwrite=True, progress=False)
    return {"seconds": time.perf_counter() - t, "mb": stats["input"]["bytes_read"] / 1e6}


def _clean_mb(work: Path) -> float:
    """MB of the cleaned corpus: the input of the tokenizer and pack stages."""
    return sum(f.stat().st_size for f in (work / "clean").glob("*.jsonl")) / 1e6


def _texts(work: Path) -> list[str]:
    from lmforge.data.sources import DocumentReader

    return [d.text for d in DocumentReader([work / "clean"])]


@stage
def tokenizer_lmforge(work: Path) -> dict:
    from lmforge.data.sources import DocumentReader
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    t = time.perf_counter()
    reader = DocumentReader([work / "clean"])
    train_tokenizer((d.text for d in reader), TokenizerTrainConfig(vocab_size=8192), show_progress=False)
    return {"seconds": time.perf_counter() - t, "mb": _clean_mb(work)}


@stage
def tokenizer_hf_raw(work: Path) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = _texts(work)  # in memory before the clock starts: the peer reads nothing
    t = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192, min_frequency=2, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
    )
    tok.train_from_iterator(texts, trainer)
    return {"seconds": time.perf_counter() - t, "mb": _clean_mb(work)}


@stage
def pack_lmforge(work: Path) -> dict:
    from lmforge.data.pack import PackConfig, pack_corpus

    t = time.perf_counter()
    meta = pack_corpus([work / "clean"], work / "tok", work / "shards-bench", PackConfig(), overwrite=True, progress=False)
    return {"seconds": time.perf_counter() - t, "mb": meta["source_bytes"] / 1e6,
            "tokens": meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]}


def _encode_one_process(work: Path, method: str) -> dict:
    """The peer: raw HF `tokenizers` encoding the same texts in one process, one thread."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    texts = _texts(work)  # in memory before the clock starts: the peer reads and writes nothing
    tok = Tokenizer.from_file(str(work / "tok" / "tokenizer.json"))
    t = time.perf_counter()
    n = sum(len(e.ids) + 1 for e in getattr(tok, method)(texts, add_special_tokens=False))
    return {"seconds": time.perf_counter() - t, "mb": _clean_mb(work), "tokens": n}


@stage
def encode_single_process(work: Path) -> dict:
    return _encode_one_process(work, "encode_batch")


@stage
def encode_single_process_fast(work: Path) -> dict:
    """`encode_batch_fast` skips character offsets; pack uses it, so this is the like-for-like peer."""
    return _encode_one_process(work, "encode_batch_fast")


def run_stage(name: str, work: Path) -> dict:
    """Run one stage in a fresh interpreter; its figures plus the peak RSS of its process tree."""
    return run_measured(
        "import json, bench_data as b; from pathlib import Path; "
        f"print(json.dumps(b.STAGES[{name!r}](Path({str(work)!r}))))"
    )


def summarize(results: list[dict]) -> dict:
    seconds = statistics.median(r["seconds"] for r in results)
    first = results[0]
    out = {"median_s": round(seconds, 3), "runs_s": [round(r["seconds"], 3) for r in results],
           "mb": round(first["mb"], 2), "mb_per_s": round(first["mb"] / seconds, 3),
           "peak_rss_mb": round(max(r["peak_rss_mb"] for r in results), 1)}
    if "tokens" in first:
        out["tokens"] = first["tokens"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    # Inputs the measured stages read: the cleaned corpus and a tokenizer trained on it.
    from lmforge.data.clean import clean_corpus
    from lmforge.data.sources import DocumentReader
    from lmforge.tokenizer import TokenizerTrainConfig, save_tokenizer_dir, train_tokenizer

    if not (work / "clean").exists():
        clean_corpus(corpus_files(), work / "clean", progress=False)
    if not (work / "tok").exists():
        tok = train_tokenizer((d.text for d in DocumentReader([work / "clean"])), TokenizerTrainConfig(vocab_size=8192), show_progress=False)
        save_tokenizer_dir(tok, work / "tok")

    # Round-robin, so that a noisy neighbour slows a stage and its peer alike.
    runs: dict[str, list[dict]] = {name: [] for name in STAGES}
    for _ in range(args.runs):
        for name in STAGES:
            runs[name].append(run_stage(name, work))
    r = {name: summarize(results) for name, results in runs.items()}
    r["summary"] = {
        "clean_mb_per_s": r["clean"]["mb_per_s"],
        "clean_peak_rss_mb_1x_vs_3x": [r["clean"]["peak_rss_mb"], r["clean_3x"]["peak_rss_mb"]],
        "tokenizer_overhead_vs_hf": round(r["tokenizer_lmforge"]["median_s"] / r["tokenizer_hf_raw"]["median_s"] - 1, 4),
        "pack_speedup_vs_single_process_encode": round(r["encode_single_process"]["median_s"] / r["pack_lmforge"]["median_s"], 3),
        "pack_speedup_vs_single_process_encode_fast": round(r["encode_single_process_fast"]["median_s"] / r["pack_lmforge"]["median_s"], 3),
    }
    r["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
