"""A log-likelihood task harness, defined as lm-evaluation-harness defines it.

Multiple choice — a JSONL item `{"context": str, "choices": [str, ...], "answer": int}` (or the
answer as the text of a choice). Each choice is scored as the continuation `delimiter + choice`
of the context (delimiter " ", lm-eval's `target_delimiter`), tokenized as lm-eval's
`TemplateLM` does: trailing spaces of the context move to the continuation, context +
continuation are encoded together and split after the context's own tokens, an empty context is
replaced by the bos (else eos) token, and a sequence longer than the model's context is cut from
the left. Then
    acc       the choice with the highest total log-likelihood is the answer
    acc_norm  the same after dividing each total by the choice's length in characters
each with its standard error (sample standard deviation / sqrt(n)), ties going to the first
choice (numpy's argmax).

Generative — `{"context": str, "answer": str | [str, ...]}` (no `choices`): greedy generation with
the Engine until a stop string (default a newline); `exact_match` when the stripped output equals
an answer, `contains` when an answer appears in it.

Built-in tasks (`lmforge/eval/tasks_data/*.jsonl`) are small and written for lmforge so that the
command runs offline; real benchmarks come as the user's own JSONL (or through the lm-eval
adapter, lmforge.eval.lm_eval_adapter).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lmforge.errors import LmforgeError, check_counts

if TYPE_CHECKING:
    from lmforge.generate.engine import Engine

TASKS_PACKAGE = "lmforge.eval.tasks_data"


@dataclass
class TasksConfig:
    limit: int = 0  # evaluate only the first N items of each task (0 = all)
    delimiter: str = " "  # put between the context and each choice (lm-eval's target_delimiter)
    batch_tokens: int = 4096  # tokens scored per forward pass
    max_new_tokens: int = 32  # generative tasks: tokens generated per item at most
    stop: list[str] = field(default_factory=lambda: ["\n"])  # generative tasks: generation ends at any of these
    batch_size: int = 8  # generative tasks: prompts generated together

    def __post_init__(self) -> None:
        check_counts(self, at_least_0=("limit",), at_least_1=("batch_tokens", "max_new_tokens", "batch_size"))


@dataclass
class Item:
    context: str
    choices: list[str] | None  # None: a generative item
    answer: int | list[str]  # index of the right choice, or the accepted answers
    line: int


@dataclass
class Task:
    name: str
    path: Path
    items: list[Item]
    sha256: str

    @property
    def type(self) -> str:
        return "generate" if self.items[0].choices is None else "multiple_choice"


# -- loading ---------------------------------------------------------------------------------------
def builtin_tasks() -> dict[str, Path]:
    """Built-in task name -> its JSONL file."""
    folder = resources.files(TASKS_PACKAGE)
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".jsonl")}


def resolve_tasks(specs: Sequence[str], limit: int = 0) -> list[Task]:
    """Task names (built-in) or JSONL paths; each spec may hold several, comma-separated."""
    names = [s.strip() for spec in specs for s in spec.split(",") if s.strip()]
    if not names:
        raise LmforgeError("no task given: name a built-in task or a JSONL file (--tasks arithmetic,facts)")
    builtins = builtin_tasks()
    tasks = []
    for name in names:
        path = Path(name)
        if name in builtins and not path.exists():
            tasks.append(load_task(builtins[name], name, limit))
        elif path.suffix in (".jsonl", ".gz") or path.exists():
            tasks.append(load_task(path, path.name.split(".")[0], limit))
        else:
            raise LmforgeError(f"unknown task {name!r}: not a JSONL file, nor a built-in task "
                               f"({', '.join(sorted(builtins))})")
    seen = set()
    for t in tasks:
        if t.name in seen:
            raise LmforgeError(f"task {t.name!r} given twice")
        seen.add(t.name)
    return tasks


def load_task(path: str | os.PathLike, name: str | None = None, limit: int = 0) -> Task:
    from lmforge.jsonio import read_jsonl
    from lmforge.fsutil import sha256_file

    path = Path(path)
    items: list[Item] = []
    kind = None
    for lineno, obj in read_jsonl(path):
        item = _parse_item(obj, f"{path}:{lineno}", lineno)
        this = "generate" if item.choices is None else "multiple_choice"
        if kind is None:
            kind = this
        elif this != kind:
            raise LmforgeError(f"{path}:{lineno}: a {this} item in a {kind} task (all items need `choices`, or none)")
        items.append(item)
        if limit and len(items) >= limit:
            break
    return Task(name or path.stem, path, items, sha256_file(path))


def _parse_item(obj, where: str, line: int) -> Item:
    if not isinstance(obj, dict):
        raise LmforgeError(f"{where}: expected an object with context, choices and answer")
    context = obj.get("context")
    if not isinstance(context, str):
        raise LmforgeError(f"{where}: missing 'context' (a string)")
    if "answer" not in obj:
        raise LmforgeError(f"{where}: missing 'answer'")
    answer = obj["answer"]
    choices = obj.get("choices")
    if choices is None:  # generative
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise LmforgeError(f"{where}: a generative item's 'answer' must be a non-empty string or list of them")
        return Item(context, None, answers, line)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise LmforgeError(f"{where}: 'choices' must be a list of at least 2 strings")
    if any(c == "" for c in choices):
        raise LmforgeError(f"{where}: choice {choices.index('')} is empty (nothing to score)")
    if isinstance(answer, str):
        if answer not in choices:
            raise LmforgeError(f"{where}: answer {answer!r} is not one of the choices")
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise LmforgeError(f"{where}: 'answer' must be the index of the right choice (an integer), got {answer!r}")
    if not 0 <= answer < len(choices):
        raise LmforgeError(f"{where}: answer index {answer} is out of range for {len(choices)} choices "
                           f"(0..{len(choices) - 1})")
    return Item(context, list(choices), answer, line)


# -- log-likelihoods (shared with the lm-eval adapter) --------------------------------------------
def prefix_token(tokenizer) -> int:
    """What an empty context is replaced by (lm-eval's prefix_token_id): bos, else eos."""
    tok = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if tok is None:
        raise LmforgeError("the tokenizer names neither a bos nor an eos token: an empty context cannot be scored")
    return tok


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's TemplateLM.loglikelihood makes them."""
    if context == "":
        cont = tokenizer.encode(continuation)
        prefix = prefix_token(tokenizer)
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if not ctx:  # the context was only whitespace
        return [prefix_token(tokenizer)], whole
    return ctx, whole[len(ctx):]


def loglikelihoods(engine: "Engine", requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   batch_tokens: int = 4096) -> list[tuple[float, bool, bool]]:
    """(total log-likelihood of the continuation, whether greedy decoding would produce it, whether
    the context was cut) for each (context ids, continuation ids).

    Requests that share a context (a multiple-choice item's choices) are scored together on one
    run of the context (`Engine.score_continuations`); a sequence longer than the model's context
    keeps its last block_size + 1 tokens, as lm-eval cuts it, and goes through `Engine.score`.
    """
    block = engine.config.block_size
    shared: dict[tuple[int, ...], list[int]] = {}
    cut_idx: list[int] = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise LmforgeError("a continuation encodes to no tokens: nothing to score")
        if len(cont) > block:
            raise LmforgeError(f"a continuation of {len(cont)} tokens exceeds the model's context of {block}")
        if not ctx:
            raise LmforgeError("an empty context: give the prefix token (see encode_pair)")
        if len(ctx) + len(cont) - 1 > block:
            cut_idx.append(i)
        else:
            shared.setdefault(tuple(ctx), []).append(i)
    out: list[tuple[float, bool, bool] | None] = [None] * len(requests)
    groups = list(shared.items())
    scored = engine.score_continuations([(ctx, [requests[i][1] for i in idx]) for ctx, idx in groups],
                                        batch_tokens=batch_tokens)
    for (_ctx, idx), scores in zip(groups, scored):
        for i, s in zip(idx, scores):
            out[i] = (s.total, s.all_greedy, False)
    if cut_idx:
        seqs = [(list(requests[i][0]) + list(requests[i][1]))[-(block + 1):] for i in cut_idx]
        starts = [len(seq) - len(requests[i][1]) for seq, i in zip(seqs, cut_idx)]
        for i, s in zip(cut_idx, engine.score(seqs, starts, batch_tokens=batch_tokens)):
            out[i] = (s.total, s.all_greedy, True)
    return out  # type: ignore[return-value]


# -- metrics ----------------------------------------------------------------------------------------
def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample standard deviation / sqrt(n) (lm-eval's mean_stderr)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on ties (as numpy.argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


@dataclass
class TaskResult:
    name: str
    type: str
    n: int
    metrics: dict[str, float]  # acc, acc_norm / exact_match, contains
    stderr: dict[str, float | None]
    items: list[dict]  # per item: what was predicted
    truncated: int = 0
    seconds: float = 0.0
    chance: float | None = None  # multiple choice: the accuracy of guessing


    def to_dict(self, path: Path, sha256: str) -> dict:
        out: dict = {"type": self.type, "n": self.n, "metrics": list(self.metrics)}
        for k, v in self.metrics.items():
            out[k] = v
            out[f"{k}_stderr"] = self.stderr[k]
        if self.chance is not None:
            out["chance"] = self.chance
        out.update(path=str(path), sha256=sha256, truncated=self.truncated, seconds=round(self.seconds, 3),
                   items_per_s=round(self.n / self.seconds, 2) if self.seconds > 0 else None)
        return out


def run_multiple_choice(engine: "Engine", task: Task, config: TasksConfig) -> TaskResult:
    started = time.perf_counter()
    tok = engine.tokenizer
    requests, owner = [], []
    for k, item in enumerate(task.items):
        for choice in item.choices:  # type: ignore[union-attr]
            requests.append(encode_pair(tok, item.context, config.delimiter + choice))
            owner.append(k)
    for (ctx, cont), k in zip(requests, owner):
        if not cont:
            raise LmforgeError(f"{task.path}:{task.items[k].line}: a choice encodes to no tokens")
    scored = loglikelihoods(engine, requests, batch_tokens=config.batch_tokens)
    acc, acc_norm, details, truncated = [], [], [], 0
    pos = 0
    for item in task.items:
        lls = [s[0] for s in scored[pos : pos + len(item.choices)]]  # type: ignore[arg-type]
        truncated += any(s[2] for s in scored[pos : pos + len(item.choices)])  # type: ignore[arg-type]
        pos += len(item.choices)  # type: ignore[arg-type]
        pred = argmax(lls)
        pred_norm = argmax([ll / len(c) for ll, c in zip(lls, item.choices)])  # type: ignore[arg-type]
        acc.append(float(pred == item.answer))
        acc_norm.append(float(pred_norm == item.answer))
        details.append({"line": item.line, "answer": item.answer, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls})
    return TaskResult(task.name, "multiple_choice", len(task.items),
                      {"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm)},
                      {"acc": mean_stderr(acc), "acc_norm": mean_stderr(acc_norm)}, details, truncated,
                      time.perf_counter() - started,
                      chance=sum(1 / len(i.choices) for i in task.items) / len(task.items))  # type: ignore[arg-type]


def run_generative(engine: "Engine", task: Task, config: TasksConfig) -> TaskResult:
    from lmforge.eval.bleu import generate_batched
    from lmforge.generate.sampling import SamplingParams

    started = time.perf_counter()
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0, stop=list(config.stop))
    prompts, truncated = [], 0
    for item in task.items:
        ids = engine.encode(item.context) if item.context else [prefix_token(engine.tokenizer)]
        kept = engine.check_length(ids, params, "left")
        truncated += len(kept) < len(ids)
        prompts.append(kept)
    outputs = generate_batched(engine, prompts, params, config.batch_size)
    em, contains, details = [], [], []
    for item, out in zip(task.items, outputs):
        answers = [a.strip() for a in item.answer]  # type: ignore[union-attr]
        em.append(float(out in answers))
        contains.append(float(any(a in out for a in answers)))
        details.append({"line": item.line, "answer": item.answer, "output": out})
    return TaskResult(task.name, "generate", len(task.items),
                      {"exact_match": sum(em) / len(em), "contains": sum(contains) / len(contains)},
                      {"exact_match": mean_stderr(em), "contains": mean_stderr(contains)}, details, truncated,
                      time.perf_counter() - started)


def run_task(engine: "Engine", task: Task, config: TasksConfig | None = None) -> TaskResult:
    config = config or TasksConfig()
    if config.batch_tokens < 1 or config.batch_size < 1:
        raise LmforgeError("--batch-tokens and --batch-size must be positive")
    if task.type == "multiple_choice":
        return run_multiple_choice(engine, task, config)
    return run_generative(engine, task, config)


def evaluate_tasks(model_spec: str, specs: Sequence[str], config: TasksConfig | None = None, *,
                   device: str = "cpu", log_items: bool = False, progress: bool = False) -> dict:
    """`lmforge eval tasks MODEL --tasks ...`: a result dict with `tasks` {name: {...}} and
    `average` (the mean of each task's first metric)."""
    from lmforge.eval.perplexity import load_engine
    from lmforge.eval.results import make_result, model_info

    config = config or TasksConfig()
    tasks = resolve_tasks(specs, config.limit)
    engine, loaded = load_engine(model_spec, device)
    out, notes, items = {}, [], {}
    for task in tasks:
        if progress:
            import sys

            print(f"lmforge: {task.name}: {len(task.items)} {task.type} items", file=sys.stderr, flush=True)
        res = run_task(engine, task, config)
        out[task.name] = res.to_dict(task.path, task.sha256)
        items[task.name] = res.items
        if res.truncated:
            notes.append(f"{task.name}: {res.truncated} items longer than the model's context were cut from the left")
    first = [t[t["metrics"][0]] for t in out.values()]
    settings = {"delimiter": config.delimiter, "limit": config.limit, "batch_tokens": config.batch_tokens,
                "max_new_tokens": config.max_new_tokens, "stop": list(config.stop), "device": str(engine.device),
                # generative tasks decode on the backend measured fastest here; null: none decoded
                "decode_backend": engine.decode_backend_used}
    return make_result("tasks", model=model_info(model_spec, loaded), data=None, settings=settings,
                       metrics={"tasks": out, "average": sum(first) / len(first)},
                       details={"items": items} if log_items else None, notes=notes)
