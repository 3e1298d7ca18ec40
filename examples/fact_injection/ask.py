"""Ask a model the held-out and control questions; print each answer and whether it holds.

    python examples/fact_injection/ask.py MODEL [MODEL...] [--data examples/fact_injection/data]

MODEL is anything lmforge loads: `smollm2-135m-instruct`, a fine-tuning run dir (its best
adapters, merged on load), a model dir. Greedy decoding through the chat template, as a user of
`lmforge chat` would see it. The last line is a JSON summary per model.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import lmforge


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def holds(answer: str, expect: str) -> bool:
    """`expect` is a |-separated list of acceptable answers, matched as whole words, any case."""
    return any(re.search(rf"(?<!\w){re.escape(e)}(?!\w)", answer, re.IGNORECASE) for e in expect.split("|"))


def ask(model: str, questions: list[dict], max_new_tokens: int = 40) -> list[dict]:
    gen = lmforge.pipeline("text-generation", model=model)
    chats = [[{"role": "user", "content": q["question"]}] for q in questions]
    replies = gen(chats, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)
    return [{**q, "answer": r[0]["generated_text"], "holds": holds(r[0]["generated_text"], q["expect"])}
            for q, r in zip(questions, replies)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    args = ap.parse_args()
    heldout, controls = read_jsonl(args.data / "heldout.jsonl"), read_jsonl(args.data / "controls.jsonl")
    summary = {}
    for model in args.models:
        facts, ctrl = ask(model, heldout), ask(model, controls)
        print(f"== {model}")
        for kind, rows in (("fact", facts), ("control", ctrl)):
            for r in rows:
                print(f"[{kind} {'ok' if r['holds'] else '--'}] {r['question']} -> {r['answer']!r}")
        summary[model] = {"facts": sum(r["holds"] for r in facts), "of_facts": len(facts),
                          "controls": sum(r["holds"] for r in ctrl), "of_controls": len(ctrl)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
