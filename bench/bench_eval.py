"""Evaluation speed: `lmforge eval ppl` against the transformers loop of the guide "Perplexity of
fixed-length models" on the same weights and token ids, and the task harness (tasks/s) against
lm-evaluation-harness's `hf` model on the same items.

SmolLM2-135M (the registry's smollm2-135m-instruct with --weights smollm2, else the preset's
shape with random weights), fp32, 2 threads, each system in a fresh process, interleaved, median
of --runs. Perplexity: --tokens tokens of Python standard library source, context 1024, stride
512 (every scored token sees >= 512 tokens of context); tokens/s counts scored tokens, model
load excluded, first-call warm-up (and lmforge's one-off BLAS measurement) excluded on both sides.

    .venv/bin/python bench/bench_eval.py --weights smollm2 --runs 3 > bench/results/eval.json
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

from benchutil import REPO, run_measured

sys.path.insert(0, str(REPO / "tests"))  # the transformers loop the tests check against
from pplref import hf_sliding_nll  # noqa: E402

CONTEXT, STRIDE = 1024, 512
TASKS = ("arithmetic", "code", "facts")


def build(work: Path, weights: str) -> tuple[Path, Path]:
    """An lmforge model dir and an HF folder (tokenizer included) with the same weights."""
    import torch

    from lmforge.interop.hf import save_hf_dir
    from lmforge.model.io import load_model_dir, save_model_dir
    from lmforge.tokenizer import Tokenizer

    ours, hf = work / "lmforge", work / "hf"
    if not ours.exists():
        from lmforge.interop.registry import load_model

        loaded = load_model("smollm2-135m-instruct")  # the tokenizer, and the weights with --weights smollm2
        model = loaded.model
        if weights == "random":
            from lmforge.model.config import get_preset
            from lmforge.model.gpt import GPT

            torch.manual_seed(0)
            model = GPT(get_preset("smollm2-135m"))
        save_model_dir(model, ours, tokenizer=loaded.tokenizer)
    if not hf.exists():
        model, cfg = load_model_dir(ours)
        save_hf_dir(model, cfg, hf, tokenizer=Tokenizer.load(ours))
    return ours, hf


def token_ids(work: Path, model_dir: Path, n: int) -> Path:
    """The first n tokens of a few standard-library modules, written once for both systems."""
    from lmforge.data.embedded import stdlib_files
    from lmforge.tokenizer import Tokenizer

    out = work / f"ids-{n}.json"
    if not out.exists():
        files = [p for p in stdlib_files(include_tests=False) if p.name in ("argparse.py", "typing.py", "inspect.py")]
        text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(files))
        ids = Tokenizer.load(model_dir).encode(text)[:n]
        assert len(ids) == n, f"only {len(ids)} tokens of text"
        out.write_text(json.dumps(ids))
    return out


# -- perplexity ----------------------------------------------------------------------------------
def ppl_lmforge(model_dir: str, ids_file: str) -> dict:
    import torch

    from lmforge.eval.perplexity import score_stream
    from lmforge.generate.engine import Engine
    from lmforge.interop.registry import load_model

    torch.set_num_threads(2)
    ids = json.loads(Path(ids_file).read_text())
    loaded = load_model(model_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    engine.score([ids[:CONTEXT]], [CONTEXT - STRIDE])  # warm-up
    res = score_stream(engine, ids, CONTEXT, STRIDE, batch_size=4)
    return {"tokens_per_s": res.tokens / res.seconds, "seconds": res.seconds, "tokens": res.tokens,
            "perplexity": res.perplexity}


def ppl_transformers(hf_dir: str, ids_file: str) -> dict:
    """The guide's loop, summing each window's loss over the labels it really averaged."""
    import torch
    import transformers

    torch.set_num_threads(2)
    ids = json.loads(Path(ids_file).read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        model(x[:, :CONTEXT], labels=x[:, :CONTEXT])  # warm-up
    start = time.perf_counter()
    total, count = hf_sliding_nll(model, ids, CONTEXT, STRIDE)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": count / seconds, "seconds": seconds, "tokens": count, "perplexity": float(torch.tensor(total / count).exp())}


# -- tasks ---------------------------------------------------------------------------------------
def tasks_lmforge(model_dir: str) -> dict:
    import torch

    from lmforge.eval.tasks import TasksConfig, resolve_tasks, run_task
    from lmforge.generate.engine import Engine
    from lmforge.interop.registry import load_model

    torch.set_num_threads(2)
    loaded = load_model(model_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    engine.score([[1, 2, 3]])  # warm-up (+ the one-off backend measurement)
    out, items, seconds = {}, 0, 0.0
    for task in resolve_tasks(TASKS):
        r = run_task(engine, task, TasksConfig())
        out[task.name] = r.metrics["acc"]
        items += r.n
        seconds += r.seconds
    return {"items_per_s": items / seconds, "seconds": seconds, "items": items, "acc": out}


def tasks_lm_eval_hf(hf_dir: str, yaml_dir: str) -> dict:
    import torch

    torch.set_num_threads(2)
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=yaml_dir, include_defaults=False)
    names = [f"bench_{t}" for t in TASKS]
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=hf_dir, dtype="float32", batch_size=16, device="cpu")
    lm_eval.simple_evaluate(model=lm, tasks=names[:1], task_manager=manager, limit=2, bootstrap_iters=1)  # warm-up
    start = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=1)
    seconds = time.perf_counter() - start
    items = sum(len(res["samples"][n]) for n in names) if "samples" in res else None
    acc = {n.removeprefix("bench_"): res["results"][n]["acc,none"] for n in names}
    return {"items_per_s": (items or 0) / seconds, "seconds": seconds, "items": items, "acc": acc}


def write_yaml_tasks(work: Path) -> Path:
    from lmforge.eval.tasks import builtin_tasks

    d = work / "lm_eval_tasks"
    d.mkdir(exist_ok=True)
    for name in TASKS:
        (d / f"bench_{name}.yaml").write_text(
            f"task: bench_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(builtin_tasks()[name]))}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
            "doc_to_target: answer\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights", choices=["random", "smollm2"], default="smollm2")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of text for perplexity")
    ap.add_argument("--skip-tasks", action="store_true")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmforge-bench-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    ours, hf = build(work, args.weights)
    ids = token_ids(work, ours, args.tokens)
    env = {"OMP_NUM_THREADS": "2", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf-cache"), "TOKENIZERS_PARALLELISM": "false"}
    codes = {
        "ppl_lmforge": f"import json, bench_eval as b; print(json.dumps(b.ppl_lmforge({str(ours)!r}, {str(ids)!r})))",
        "ppl_transformers": f"import json, bench_eval as b; print(json.dumps(b.ppl_transformers({str(hf)!r}, {str(ids)!r})))",
    }
    if not args.skip_tasks:
        yaml_dir = write_yaml_tasks(work)
        codes["tasks_lmforge"] = f"import json, bench_eval as b; print(json.dumps(b.tasks_lmforge({str(ours)!r})))"
        codes["tasks_lm_eval_hf"] = (f"import json, bench_eval as b; "
                                     f"print(json.dumps(b.tasks_lm_eval_hf({str(hf)!r}, {str(yaml_dir)!r})))")
    raw: dict[str, list[dict]] = {k: [] for k in codes}
    for _ in range(args.runs):
        for name, code in codes.items():
            raw[name].append(run_measured(code, env=env))
    result: dict = {}
    for name, runs in raw.items():
        key = "tokens_per_s" if name.startswith("ppl") else "items_per_s"
        med = statistics.median(r[key] for r in runs)
        result[name] = {key: round(med, 2), "runs": [round(r[key], 2) for r in runs],
                        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                        **{k: v for k, v in runs[0].items() if k not in (key, "peak_rss_mb", "seconds")}}
    summary = {
        "weights": args.weights, "context": CONTEXT, "stride": STRIDE, "ppl_tokens": args.tokens,
        "ppl_speedup": round(result["ppl_lmforge"]["tokens_per_s"] / result["ppl_transformers"]["tokens_per_s"], 3),
        "ppl_relative_difference": abs(result["ppl_lmforge"]["perplexity"] / result["ppl_transformers"]["perplexity"] - 1),
    }
    if not args.skip_tasks:
        summary["tasks_speedup"] = round(result["tasks_lmforge"]["items_per_s"] / result["tasks_lm_eval_hf"]["items_per_s"], 3)
        summary["tasks_same_accuracy"] = result["tasks_lmforge"]["acc"] == result["tasks_lm_eval_hf"]["acc"]
    result["summary"] = summary
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                         "load_average_at_end": os.getloadavg()}
    text = json.dumps(result, indent=2)
    print(text)
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "eval.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
