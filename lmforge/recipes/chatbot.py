"""`lmforge recipe run chatbot`: a support chatbot by supervised fine-tuning (LoRA) on chats, judged
on chats it never saw.

The built-in chat set (lmforge/recipes/data/chatbot/, written by its make_data.py) is a support
assistant for an invented espresso machine: facts no base model can know (maker, prices, support
hours, return policy, warranty, a troubleshooting procedure), system prompts that name the
assistant and hold the customer's order, and multi-turn chats whose answers depend on the turn
before. Its held-out chats (paraphrased and recombined, never trained on) give

- the held-out loss: mean cross-entropy per token on the assistant turns only, the tokens
  fine-tuning trains on (the same renderer and loss mask: lmforge.train.sft.load_examples);
- the scripted checks: each held-out chat without its last assistant turn is put to the model
  (greedy, earlier assistant turns as scripted) and the reply must match the chat's `expect`
  regex (a fact, a follow-up that needs the turn before, the system prompt obeyed);
- controls: general-knowledge questions the base model answers right, asked again after
  fine-tuning: forgetting shows there.

With `--data FILE` (the user's chats, in any chat layout fine-tuning reads: OpenAI `messages`,
ShareGPT `conversations`, Alpaca `instruction/output`) the records are split by position: every
10th (from the 10th) is held out, every 10th (from the 5th) is fine-tuning's val split, the rest
trains. The held-out loss is then on those chats; scripted checks run only when `--checks FILE`
gives them (JSONL records `{"messages": [...], "expect": "regex"}`, a last assistant turn being
dropped before asking), and the controls always run.

Stages (each resumable): data -> baseline -> finetune -> after -> report.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmforge.errors import LmforgeError
from lmforge.recipes import RECIPES
from lmforge.recipes.stages import RecipeDir, resuming, steps_for_budget

BUILTIN_DATA = Path(__file__).resolve().parent / "data" / "chatbot"
SPLITS = ("train", "val", "heldout", "controls")
MIN_USER_CHATS = 10


@dataclass
class ChatbotConfig:
    out: Path = Path("runs/recipe-chatbot")
    model: str = "smollm2-135m-instruct"
    data: Path | None = None  # the user's chats (JSONL); None = the built-in support set
    checks: Path | None = None  # scripted checks for --data (JSONL: messages + expect)
    budget: float = RECIPES["chatbot"].budget  # minutes for the whole recipe; fine-tuning gets what the evaluations leave (see _finetune)
    max_steps: int = 0  # a fixed step count instead of the budget (tests)
    batch_size: int = 8
    lr: float = 3e-4
    lora_rank: int = 16
    replay: float = 0.3  # share of training chats that are the base model's own replies (against forgetting)
    block_size: int = 512
    max_new_tokens: int = 48  # per check / control reply (greedy)
    overwrite: bool = False
    progress: bool = True
    calibration_steps: int = 8  # timed to turn minutes into steps

    def recorded(self) -> dict:
        """What decides the results: a continued run must have the same."""
        skip = {"out", "overwrite", "progress"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def run_chatbot(cfg: ChatbotConfig, echo: Callable[[str], None] = print) -> dict:
    from lmforge.train.metrics import METRICS_FILE

    recipe = RecipeDir(cfg.out, "chatbot", cfg.recorded(), overwrite=cfg.overwrite, echo=echo, budget_minutes=cfg.budget)
    out = recipe.out
    data = recipe.stage("data", lambda: prepare_data(cfg, out))
    before = recipe.stage("baseline", lambda: evaluate(cfg.model, data, cfg, echo))
    tuned = recipe.stage("finetune", lambda: _finetune(cfg, recipe, data, before, echo))
    after = recipe.stage("after", lambda: evaluate(tuned["model"], data, cfg, echo))
    template = show_template(cfg.model, data)
    plot = plot_chatbot(Path(tuned["model"]) / METRICS_FILE, before, after, out / "chatbot.png")
    results = {"data": data, "template": template, "finetune": tuned, "before": before, "after": after,
               "plot": str(plot), "commands": commands(Path(tuned["model"]), data)}
    recipe.finish(results, chatbot_report(cfg, results))
    return results


# -- data ------------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    from lmforge.jsonio import read_jsonl

    return [r for _, r in read_jsonl(path, allow_empty=True)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from lmforge.fsutil import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def check_chats(path: Path) -> list[dict]:
    """The records of a chat JSONL, each checked by fine-tuning's own reader (one-line errors)."""
    from lmforge.jsonio import read_jsonl
    from lmforge.train.sft import _check_chat, record_to_messages

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file")
    if path.suffix != ".jsonl":
        raise LmforgeError(f"{path}: the chatbot recipe reads chat JSONL (messages, conversations or instruction/output "
                           "records), not a text file")
    records = []
    for i, record in read_jsonl(path, allow_empty=True):  # i: the file's line number, blank lines counted
        records.append(record)
        kind, messages, _ = record_to_messages(record, f"{path}:{i}")
        if kind == "text":
            raise LmforgeError(f"{path}:{i}: a text record; the chatbot recipe trains on chats (messages, "
                               "conversations or instruction/output)")
        _check_chat(messages, f"{path}:{i}")
    return records


def read_checks(path: Path) -> list[dict]:
    """Scripted checks: {"messages": [...], "expect": regex, optional "id"/"kind"}, the chat ending
    in a user turn (or in an assistant turn, the reference, which is dropped before asking)."""
    from lmforge.chat import check_messages
    from lmforge.jsonio import read_jsonl

    path = Path(path)
    checks = []
    for i, record in read_jsonl(path, allow_empty=True):  # i: the file's line number
        where = f"{path}:{i}"
        if not isinstance(record.get("messages"), list) or not isinstance(record.get("expect"), str):
            raise LmforgeError(f"{where}: a check needs 'messages' (a chat) and 'expect' (a regex its reply must match)")
        try:
            re.compile(record["expect"])
        except re.error as e:
            raise LmforgeError(f"{where}: 'expect' is not a regex ({e})") from None
        check_messages(record["messages"], where)
        checks.append({"id": record.get("id", f"check-{i}"), "kind": record.get("kind", "check"),
                       "messages": record["messages"], "expect": record["expect"]})
    if not checks:
        raise LmforgeError(f"{path}: no checks")
    return checks


def prepare_data(cfg: ChatbotConfig, out: Path) -> dict:
    """OUT/data/{train,val,heldout,controls}.jsonl (+ checks.jsonl): the built-in set, or the user's
    chats split by position."""
    folder = out / "data"
    folder.mkdir(exist_ok=True)
    if cfg.data is None:
        if cfg.checks is not None:
            raise LmforgeError("--checks goes with --data (the built-in set has its own checks)")
        split = {name: read_records(BUILTIN_DATA / f"{name}.jsonl") for name in SPLITS}
        checks = [{k: r[k] for k in ("id", "kind", "messages", "expect")} for r in split["heldout"] if "expect" in r]
        source = "built-in (lmforge/recipes/data/chatbot)"
    else:
        records = check_chats(Path(cfg.data))
        if len(records) < MIN_USER_CHATS:
            raise LmforgeError(f"{cfg.data}: {len(records)} chats; the recipe needs at least {MIN_USER_CHATS} "
                               "(every 10th is held out, every 10th is for validation)")
        split = {"train": [r for i, r in enumerate(records) if i % 10 not in (4, 9)],
                 "val": [r for i, r in enumerate(records) if i % 10 == 4],
                 "heldout": [r for i, r in enumerate(records) if i % 10 == 9],
                 "controls": read_records(BUILTIN_DATA / "controls.jsonl")}
        checks = read_checks(Path(cfg.checks)) if cfg.checks is not None else []
        source = str(cfg.data)
    for name, records in split.items():
        _write_jsonl(folder / f"{name}.jsonl", records)
    _write_jsonl(folder / "checks.jsonl", checks)
    return {"source": source, **{name: str(folder / f"{name}.jsonl") for name in SPLITS},
            "checks": str(folder / "checks.jsonl"), "counts": {**{k: len(v) for k, v in split.items()}, "checks": len(checks)}}


# -- evaluation ------------------------------------------------------------------------------

def heldout_loss(loaded, path: str | Path, block_size: int, batch_size: int = 8) -> dict:
    """Mean cross-entropy per token over the assistant turns of the chats in `path` (the tokens
    fine-tuning trains on: same rendering, same mask), and per chat."""
    import torch
    import torch.nn.functional as F

    from lmforge.train.sft import collate, load_examples

    tok, model = loaded.tokenizer, loaded.model
    block = min(block_size, model.config.block_size)
    examples, stats = load_examples(path, tok, block_size=block, fmt="auto")
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    per_chat = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            x, y, *_ = collate([[e] for e in examples[i : i + batch_size]], pad)
            logits, _ = model(x)
            nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-100, reduction="none")
            for row, targets in zip(nll, y):
                n = int((targets != -100).sum())
                per_chat.append((float(row.sum()), n))
    total, count = sum(s for s, _ in per_chat), sum(n for _, n in per_chat)
    if count == 0:
        raise LmforgeError(f"{path}: no assistant tokens to score")
    return {"loss": round(total / count, 4), "tokens": count, "chats": len(examples), "truncated": stats.truncated,
            "per_chat": [round(s / n, 4) if n else None for s, n in per_chat]}


def matches(reply: str, expect: str) -> bool:
    return re.search(expect, reply, re.IGNORECASE) is not None


def ask(engine, tokenizer, chats: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy replies to chats (each ending in a user turn), rendered by the chat template as
    `lmforge chat` renders them; one batched Engine call."""
    from lmforge.chat import render_chat
    from lmforge.generate.params import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    # A chat longer than the model's context keeps its end (a small model's short context only).
    ids = [engine.check_length(render_chat(tokenizer, chat, add_generation_prompt=True).ids, params, "left")
           for chat in chats]
    return [c.text.strip() for c in engine.generate_ids(ids, params)]


def prompt_of(messages: list[dict]) -> list[dict]:
    """The chat a check asks: without its last assistant turn (the reference reply)."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else list(messages)


def evaluate(model: str, data: dict, cfg: ChatbotConfig, echo: Callable[[str], None]) -> dict:
    """Held-out loss, scripted checks and controls for one model (base or tuned)."""
    from lmforge.generate.engine import Engine
    from lmforge.interop.registry import load_model

    loaded = load_model(model, dequantize=True)  # the fp32 weights fine-tuning starts from
    t0 = time.time()
    loss = heldout_loss(loaded, data["heldout"], cfg.block_size)
    engine = Engine.for_loaded(loaded)
    checks = read_records(Path(data["checks"]))
    controls = read_records(Path(data["controls"]))
    replies = ask(engine, loaded.tokenizer, [prompt_of(c["messages"]) for c in checks]
                  + [[{"role": "user", "content": c["question"]}] for c in controls], cfg.max_new_tokens)
    check_rows = [{"id": c["id"], "kind": c["kind"], "reply": r, "pass": matches(r, c["expect"])}
                  for c, r in zip(checks, replies)]
    control_rows = [{"question": c["question"], "reply": r, "pass": matches(r, c["expect"])}
                    for c, r in zip(controls, replies[len(checks):])]
    passed = sum(r["pass"] for r in check_rows)
    kept = sum(r["pass"] for r in control_rows)
    echo(f"[chatbot] {model}: held-out loss {loss['loss']:.4f}, checks {passed}/{len(check_rows)}, "
         f"controls {kept}/{len(control_rows)} ({time.time() - t0:.0f} s)")
    return {"model": model, "heldout": loss, "checks": check_rows, "controls": control_rows,
            "checks_passed": passed, "controls_passed": kept}


# -- fine-tuning -----------------------------------------------------------------------------

def _finetune(cfg: ChatbotConfig, recipe: RecipeDir, data: dict, before: dict, echo: Callable[[str], None]) -> dict:
    from lmforge.model.lora import LoRAConfig
    from lmforge.train.config import FinetuneConfig, FinetuneTrainConfig
    from lmforge.train.finetune import finetune

    def train_config(max_steps: int, timing: bool = False, clock: float = 0.0) -> FinetuneTrainConfig:
        # The timing run evaluates and checkpoints only at its end, outside the timed window.
        every = max_steps if timing else max(1, max_steps // 8)
        return FinetuneTrainConfig(max_steps=max_steps, batch_size=cfg.batch_size, block_size=cfg.block_size, lr=cfg.lr,
                                   min_lr=cfg.lr / 10, warmup_steps=max(1, min(5, max_steps // 10)),
                                   eval_every=every, checkpoint_every=every, log_every=1, time_budget=clock)

    lora = LoRAConfig(rank=cfg.lora_rank)
    out = recipe.out
    run_dir = out / "run"

    def train(folder: Path, max_steps: int, ft: FinetuneConfig, progress: bool = False, resume: bool = False,
              clock: float = 0.0) -> dict:
        timing = folder != run_dir
        return finetune(cfg.model, data["train"], folder, ft, train_config(max_steps, timing, clock), lora,
                        val_data=data["val"], resume=resume, overwrite=not resume, progress=progress, sample_count=0)

    # The run: replay of the base model's own replies, and the retention check (fine-tuning's defaults).
    ft = FinetuneConfig(method="lora", data_format="auto", select="final", replay=cfg.replay)
    clock = 0.0  # the training's own clock, a backstop where the steps run slower than timed
    if cfg.max_steps:
        steps, minutes = cfg.max_steps, None
    elif resuming(run_dir):
        steps, minutes = _saved_steps(run_dir), None
    else:
        # The evaluation after costs about what the baseline did, and so do the base model's replies
        # that fine-tuning writes first (replay and the retention check: ~60 greedy replies); the
        # timing run's own time comes out of what is left (steps_for_budget).
        minutes = recipe.training_minutes(2 * before["stage_seconds"], "the base model's replies for replay and the "
                                          "evaluation after")
        # Timed without replay/retention: they only add the base model's replies up front, not step time.
        quick = FinetuneConfig(method="lora", data_format="auto", replay=0.0, retention_tolerance=0.0)
        plan = steps_for_budget(lambda folder, n: train(folder, n, quick), out / "run.calibration", minutes,
                                 steps=cfg.calibration_steps, window=(2, cfg.calibration_steps - 2), echo=echo)
        steps, clock = plan.steps, plan.seconds
    summary = train(run_dir, steps, ft, progress=cfg.progress, resume=resuming(run_dir), clock=clock)
    keys = ("steps", "stopped_because", "train_seconds", "start_val_loss", "val_loss", "best_val_loss", "retention_start", "retention_end",
            "retention_warned_at", "tokens_seen", "trainable_params", "examples")
    return {"model": str(run_dir), "base": cfg.model, "lora_rank": cfg.lora_rank, "lr": cfg.lr, "batch_size": cfg.batch_size,
            "train_minutes": minutes, **{k: summary.get(k) for k in keys}}


def _saved_steps(run_dir: Path) -> int:
    """The step count an interrupted run was started with (its config), so that it resumes as planned."""
    import yaml

    from lmforge.train.pretrain import RUN_CONFIG

    return int(yaml.safe_load((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))["train"]["max_steps"])


# -- report ----------------------------------------------------------------------------------

def show_template(model: str, data: dict) -> dict:
    """One training chat as the chat template renders it, with the loss mask: the spans the loss
    is taken on (assistant turns, end-of-turn token included) and the count of tokens under it."""
    from lmforge.chat import render_chat
    from lmforge.interop.registry import resolve_model_dir
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.sft import record_to_messages

    tok = Tokenizer.load(resolve_model_dir(model))
    chats = [record_to_messages(r, "train")[1] for r in read_records(Path(data["train"]))]
    # The richest one: a system prompt and the most turns.
    chat = max(chats, key=lambda m: (m[0]["role"] == "system", len(m), -sum(len(x["content"]) for x in m)))
    rendered = render_chat(tok, chat)
    runs: list[list] = []  # [under the loss?, token ids]: consecutive tokens alike, decoded together
    for i, m in zip(rendered.ids, rendered.loss_mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(i)
        else:
            runs.append([m, [i]])
    return {"messages": chat, "text": rendered.text, "spans": [[bool(m), tok.decode(ids)] for m, ids in runs],
            "tokens": len(rendered.ids), "loss_tokens": sum(rendered.loss_mask)}


def masked_text(spans: list) -> str:
    """The rendered chat with the tokens under the loss between ⟦ and ⟧."""
    return "".join(f"⟦{s}⟧" if trained else s for trained, s in spans)


def commands(run_dir: Path, data: dict) -> list[str]:
    system = next((m["content"] for r in read_records(Path(data["heldout"]))
                   for m in r.get("messages", [])[:1] if m.get("role") == "system"), None)
    chat = f"lmforge chat {run_dir}" + (f" --system {json.dumps(system)}" if system else "")
    return [chat, f"lmforge serve {run_dir}", f"lmforge merge {run_dir} -o {run_dir.parent / 'merged'}"]


def plot_chatbot(metrics: Path, before: dict, after: dict, path: Path) -> Path:
    """Left: train/val/retention loss over the fine-tune, held-out loss before (at step 0) and
    after (at the last step). Right: checks passed per kind and controls kept, before and after."""
    from lmforge.report import grouped_bars, save_png, subplots
    from lmforge.train.metrics import column, read_metrics

    fig, (ax, bars) = subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    rows = read_metrics(metrics) if metrics.is_file() else []
    for name, style in (("train_loss", "-"), ("val_loss", "o-"), ("retention_loss", "s--")):
        steps, values = column(rows, name)
        if steps:
            ax.plot(steps, values, style, label=name.replace("_", " "), markersize=3)
    last = max((int(r["step"]) for r in rows), default=1)
    ax.plot([0, last], [before["heldout"]["loss"], after["heldout"]["loss"]], "k*", markersize=10,
            label=f"held-out chats: {before['heldout']['loss']:.3f} → {after['heldout']['loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on assistant tokens (nats/token)")
    ax.set_title("fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    kinds = list(dict.fromkeys(r["kind"] for r in before["checks"])) + ["controls"]

    def share(result: dict, kind: str) -> float:
        rows = result["controls"] if kind == "controls" else [r for r in result["checks"] if r["kind"] == kind]
        return sum(r["pass"] for r in rows) / len(rows) if rows else 0.0

    grouped_bars(bars, kinds, {label: [share(result, kind) for kind in kinds]
                               for label, result in (("before", before), ("after", after))},
                 ylabel="share passed", title="scripted checks and controls")
    bars.set_ylim(0, 1.05)
    fig.tight_layout()
    return save_png(fig, path)


def _cell(text: str, limit: int = 160) -> str:
    if not text.strip():
        return "(empty)"
    text = " ⏎ ".join(part for part in text.strip().splitlines() if part.strip()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def chatbot_report(cfg: ChatbotConfig, results: dict) -> str:
    from lmforge.report import markdown_table

    data, ft, before, after, tpl = results["data"], results["finetune"], results["before"], results["after"], results["template"]
    counts = data["counts"]
    nb, na = before["heldout"]["loss"], after["heldout"]["loss"]
    n_checks, n_controls = len(before["checks"]), len(before["controls"])
    lines = [f"# Recipe: chatbot — {cfg.model}", "",
             f"Data: {data['source']}: {counts['train']} training chats, {counts['val']} for validation, "
             f"{counts['heldout']} held out, {counts['checks']} scripted checks, {counts['controls']} control questions.", "",
             f"LoRA (rank {ft['lora_rank']}, lr {ft['lr']:g}, batch {ft['batch_size']}, replay {cfg.replay:g}) on {cfg.model}: "
             f"{ft['steps']} steps in {ft['train_seconds'] or 0:.0f} s"
             + (f" (budget: {ft['train_minutes']:.1f} min of fine-tuning)" if ft.get("train_minutes") else "") + ".", "",
             markdown_table(["", "before", "after"], [
                 ["held-out loss (assistant tokens, nats/token)", nb, na],
                 ["scripted checks passed", f"{before['checks_passed']}/{n_checks}", f"{after['checks_passed']}/{n_checks}"],
                 ["controls right", f"{before['controls_passed']}/{n_controls}", f"{after['controls_passed']}/{n_controls}"],
                 ["val loss (fine-tuning's split)", ft.get("start_val_loss"), ft.get("val_loss")],
                 ["retention loss (base model's own replies)", ft.get("retention_start"), ft.get("retention_end")],
             ]), "",
             f"![loss curves, checks and controls]({Path(results['plot']).name})", "",
             "## The chat template and the loss mask", "",
             f"One training chat as {cfg.model}'s chat template renders it ({tpl['tokens']} tokens). The loss is taken on "
             f"the {tpl['loss_tokens']} tokens between ⟦ ⟧ — the assistant's turns and their end-of-turn token; the system "
             "prompt, the user's turns and the role headers are context only.", "",
             "```", masked_text(tpl["spans"]).rstrip("\n"), "```", ""]
    if before["checks"]:
        checks = read_records(Path(data["checks"]))
        lines += ["## Scripted checks", "",
                  "Each held-out chat is put to the model without its last assistant turn (greedy; earlier assistant turns "
                  "as scripted). ✓: the reply matches the expected regex.", "",
                  markdown_table(["check", "kind", "last user turn", "expect", "before", "after"],
                                 [[c["id"], c["kind"], _cell(prompt_of(c["messages"])[-1]["content"], 80), f"`{c['expect']}`",
                                   ("✓ " if b["pass"] else "✗ ") + _cell(b["reply"]), ("✓ " if a["pass"] else "✗ ") + _cell(a["reply"])]
                                  for c, b, a in zip(checks, before["checks"], after["checks"])]), "",
                  "The conversations of the multi-turn and system-prompt checks:", ""]
        for c in checks:
            asked = prompt_of(c["messages"])
            if len(asked) > 1:
                lines.append(f"- **{c['id']}**: " + " / ".join(f"*{m['role']}*: {_cell(m['content'], 120)}" for m in asked))
        lines.append("")
    else:
        lines += ["## Scripted checks", "", "None: pass `--checks FILE` with your data to have some.", ""]
    lines += ["## Controls (general knowledge, no system prompt)", "",
              markdown_table(["question", "before", "after"],
                             [[b["question"], ("✓ " if b["pass"] else "✗ ") + _cell(b["reply"]),
                               ("✓ " if a["pass"] else "✗ ") + _cell(a["reply"])]
                              for b, a in zip(before["controls"], after["controls"])]), "",
              "## Chat with it, serve it", "", "```bash", *results["commands"], "```", "",
              "`lmforge chat` loads the run's final adapters on the base model; `lmforge serve` puts it behind the "
              "OpenAI-compatible API and the chat page; `lmforge merge` folds the adapters into a plain model dir.", ""]
    return "\n".join(lines)
