"""Rehearsal against forgetting: train on the base model's own answers to general prompts too.

A small fine-tuning set teaches its facts in a few steps, and in the same steps teaches the
model that every answer is about them ("The boiling point of water is 1.7 litres"). Early
stopping cannot see that, since the held-out split asks about the same facts. Mixing in chats
whose replies the base model wrote itself (greedy) keeps its behaviour on everything else: the
loss on those tokens is the base model's own distribution, a cheap stand-in for a KL penalty
to the base (as in the "prior preservation" of DreamBooth, or the rehearsal of continual
learning).

The same kind of chats on prompts never trained on (`retention.jsonl`) measure the drift: their
loss starts low (they are the base model's own words) and rises as the model forgets; the
Trainer's RetentionCheck warns once when the retention loss rises past a tolerance (and, with
--retention-guard, refuses to keep such a checkpoint as best).

The replies are generated once, at the start of a run, and saved in the run dir (a resumed run
reads them back, so it trains and checks on exactly the same examples).
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.fsutil import write_text_atomic

REPLAY_FILE = "replay.jsonl"
RETENTION_FILE = "retention.jsonl"
RETENTION_PROMPTS = 16  # the last prompts of PROMPTS: never trained on

# General requests of the kinds a chat model is asked, none about any fine-tuning set's topic.
# Kept apart from the control questions of tests and examples (which must stay unseen).
PROMPTS = (
    "Explain what a rainbow is in two sentences.",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "How does a bicycle stay upright when it moves?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky dark at night?",
    "Suggest a name for a friendly golden retriever.",
    "What is 12 multiplied by 11?",
    "Describe the taste of a lemon.",
    "Write one sentence encouraging someone before a job interview.",
    "What does a thermometer measure?",
    "Name three instruments in an orchestra.",
    "How do I boil an egg?",
    "What is the opposite of 'generous'?",
    "Write a Python function that returns the square of a number.",
    "Why do we have seasons on Earth?",
    "What is a noun? Give an example.",
    "List the primary colours.",
    "What should I pack for a day at the beach?",
    "Explain what gravity does in one sentence.",
    "What is the main ingredient of guacamole?",
    "How many minutes are in two hours?",
    "Give a short definition of democracy.",
    "What animal is known as the king of the jungle?",
    "Recommend a way to relax after a long day.",
    "What does a dictionary contain?",
    "Write a short thank-you note to a neighbour.",
    "What is the freezing point of water in Fahrenheit?",
    "Explain what a verb is.",
    "How do bats find their way in the dark?",
    "Name a famous painting by Leonardo da Vinci.",
    "What is the plural of 'mouse'?",
    "Why should we drink water every day?",
    "What is a triangle with three equal sides called?",
    "Give me a simple recipe for a fruit salad.",
    "What language is spoken in Brazil?",
    "Describe what a library is for.",
    "What is the tallest mountain in the world?",
    "How does a refrigerator keep food cold?",
    "Write a sentence using the word 'curious'.",
    "What does the heart do in the human body?",
    "What is the largest ocean on Earth?",
    "How can I improve my handwriting?",
    "What is a synonym for 'happy'?",
    "Explain what an email is to a child.",
    "What is the square root of 81?",
    "Why do leaves change colour in the fall?",
)


def replay_count(share: float, n_train: int) -> int:
    """How many replay chats make them `share` of the training examples (at most one per prompt)."""
    if share <= 0:
        return 0
    return max(1, min(len(PROMPTS) - RETENTION_PROMPTS, round(share / (1.0 - share) * n_train)))


def write_replay(engine, count: int, path: Path, max_new_tokens: int = 64, batch_size: int = 16,
                 prompts: tuple[str, ...] | None = None) -> list[dict]:
    """The base model's greedy replies to `count` of `prompts` (default: the training share of
    PROMPTS), written to `path` as chats.

    Only replies the model finishes within `max_new_tokens` are kept: a cut-off reply would end
    in an end-of-turn token the model never chose (teaching it to stop mid-sentence), and short
    rows keep a batch of ~50-token fact chats from being padded to several times its length.
    Prompts are tried in order, a batch at a time, until `count` replies are kept."""
    from lmforge.chat import render_chat
    from lmforge.generate.sampling import SamplingParams

    pool = PROMPTS[: len(PROMPTS) - RETENTION_PROMPTS] if prompts is None else prompts
    chats: list[dict] = []
    for start in range(0, len(pool), batch_size):
        if len(chats) >= count:
            break
        batch = pool[start : start + batch_size]
        ids = [render_chat(engine.tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True).ids
               for p in batch]
        room = engine.config.block_size - max(len(i) for i in ids)  # a small model's context is the limit
        if room < 8:
            continue
        params = SamplingParams(max_new_tokens=min(max_new_tokens, room), temperature=0.0)
        for p, r in zip(batch, engine.generate_ids(ids, params)):
            if r.finish_reason == "stop" and r.text.strip():
                chats.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r.text.strip()}]})
    chats = chats[:count]
    write_text_atomic(path, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))
    return chats


def write_retention(engine, path: Path) -> list[dict]:
    """The base model's replies to the held-out prompts: the drift check's data."""
    # Longer replies than replay's: only the check reads them, and more of them finish.
    return write_replay(engine, RETENTION_PROMPTS, path, max_new_tokens=128, prompts=PROMPTS[len(PROMPTS) - RETENTION_PROMPTS:])
