"""`lmforge quickstart`: the whole pipeline on the embedded corpus, in one command.

Stages (each writes a folder under OUT, atomically): clean -> tokenizer -> shards.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from lmforge.data.clean import CleanConfig, clean_corpus
from lmforge.data.embedded import stdlib_dir, stdlib_files
from lmforge.data.pack import PackConfig, pack_corpus
from lmforge.data.sources import DocumentReader
from lmforge.fsutil import check_output_free
from lmforge.tokenizer import TokenizerTrainConfig, save_tokenizer_dir, train_tokenizer


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def run_quickstart(
    out: str | Path,
    *,
    inputs: Sequence[str] | None = None,
    vocab_size: int = 4096,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    out = Path(out)
    check_output_free(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if inputs:
        sources = list(inputs)
        _say(f"corpus: {', '.join(sources)}")
    else:
        sources = [str(p) for p in stdlib_files()]
        _say(f"corpus: the Python standard library at {stdlib_dir()} ({len(sources)} .py files)")
    timings = {}

    t = time.perf_counter()
    clean_dir = out / "clean"
    stats = clean_corpus(sources, clean_dir, CleanConfig(), overwrite=True, progress=progress)
    timings["clean_s"] = time.perf_counter() - t
    _say(f"clean: kept {stats['output']['documents']} of {stats['input']['documents']} documents "
         f"({stats['mb_per_s']:.2f} MB/s) -> {clean_dir}")

    t = time.perf_counter()
    tok_dir = out / "tokenizer"
    reader = DocumentReader([clean_dir])
    tok = train_tokenizer((d.text for d in reader), TokenizerTrainConfig(vocab_size=vocab_size),
                          source=str(clean_dir), show_progress=progress)
    save_tokenizer_dir(tok, tok_dir, overwrite=True)
    timings["tokenizer_s"] = time.perf_counter() - t
    _say(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens -> {tok_dir}")

    t = time.perf_counter()
    shards_dir = out / "shards"
    meta = pack_corpus([clean_dir], tok_dir, shards_dir, PackConfig(val_fraction=0.02), overwrite=True, progress=progress)
    timings["pack_s"] = time.perf_counter() - t
    s = meta["splits"]
    _say(f"pack: train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens -> {shards_dir}")
    _say("pretraining, sampling and the report join this command with the model stage (issue 3); "
         "the data stage is done")
    return {"clean": stats, "shards": meta, "timings": timings}
