"""A chat conversation on the Engine: history, system prompt, and a context-window guard.

The REPL (`lmforge chat`) and the server keep one ChatSession per conversation; prompts are
rendered by `lmforge.chat.render_chat`, the same function fine-tuning uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from lmforge.chat import render_chat
from lmforge.errors import LmforgeError
from lmforge.fsutil import write_text_atomic
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams


@dataclass
class ChatSession:
    engine: Engine
    params: SamplingParams
    system: str | None = None
    history: list[dict] = field(default_factory=list)  # user/assistant turns, oldest first
    notify: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.engine._decoder_only("chat")  # a chat is a growing prompt continued; a translator has none
        if self.params.num_return_sequences > 1:
            raise LmforgeError("a chat has one reply per turn: num_return_sequences must be 1")

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        self.history.clear()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_atomic(path, json.dumps({"messages": self.messages()}, indent=2, ensure_ascii=False))
        return path

    def _prompt_ids(self) -> list[int]:
        """Render the conversation; drop the oldest turns while it does not fit the context."""
        limit = self.engine.config.block_size - self.params.max_new_tokens
        head = [{"role": "system", "content": self.system}] if self.system else []
        alone = len(render_chat(self.engine.tokenizer, head + self.history[-1:], add_generation_prompt=True).ids)
        if alone > limit:
            self.history.pop()  # the new message cannot fit even alone: refuse it, keep the rest
            raise LmforgeError(
                f"message too long: {alone} tokens + {self.params.max_new_tokens} to generate exceed the "
                f"context of {self.engine.config.block_size}"
            )
        dropped = 0
        while True:
            ids = render_chat(self.engine.tokenizer, self.messages(), add_generation_prompt=True).ids
            if len(ids) <= limit:
                break
            # Drop the oldest exchange (a user turn and the reply to it).
            del self.history[: 2 if len(self.history) > 2 and self.history[1]["role"] == "assistant" else 1]
            dropped += 1
        if dropped:
            self.notify(f"[context window full: dropped the {dropped} oldest turn(s)]")
        return ids

    def send(self, text: str) -> Iterator[str]:
        """Add a user message; stream the reply in pieces; keep it in the history."""
        if not text.strip():
            raise LmforgeError("empty message")
        self.history.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        pieces = []
        # Beam search cannot stream (the winner is known only at the end): its reply comes whole.
        replies = ([self.engine.generate_ids([ids], self.params)[0].text] if self.params.beam
                   else self.engine.stream_ids(ids, self.params))
        for piece in replies:
            pieces.append(piece)
            yield piece
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})
