"""Fine-tuning data: plain text, instruction JSONL (Alpaca) and chat JSONL (OpenAI `messages`,
ShareGPT `conversations`) -> token ids + a loss mask per example -> batches for the Trainer.

Every chat-like record becomes a list of messages and goes through `lmforge.chat.render_chat`,
the one function that also renders prompts for the chat REPL and the server; the loss covers
the assistant turns only. Plain text (continued pretraining) trains on every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from lmforge.chat import render_chat
from lmforge.errors import LmforgeError
from lmforge.jsonio import read_jsonl
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import DataFormat, Overlong

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True where the loss is taken (predicting this token)
    source: str  # file:line


@dataclass
class SFTStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    format: str = ""
    trained_tokens: int = 0  # tokens under the loss mask
    total_tokens: int = 0


def record_to_messages(record: dict, where: str) -> tuple[str, list[dict] | None, str | None]:
    """(format, messages, text): one of messages/text is set."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list):
            raise LmforgeError(f"{where}: 'messages' must be a list of {{role, content}}")
        return "chat", [dict(m) if isinstance(m, dict) else m for m in msgs], None
    if "conversations" in record:
        convo = record["conversations"]
        if not isinstance(convo, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in convo):
            raise LmforgeError(f"{where}: 'conversations' must be a list of {{from, value}} (ShareGPT)")
        msgs = []
        for t in convo:
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise LmforgeError(f"{where}: unknown ShareGPT speaker {t['from']!r}")
            msgs.append({"role": role, "content": t["value"]})
        return "chat", msgs, None
    if "instruction" in record:
        if "output" not in record:
            raise LmforgeError(f"{where}: an instruction record needs 'output' (Alpaca layout: instruction, input, output)")
        prompt = str(record["instruction"])
        if record.get("input"):
            prompt += "\n\n" + str(record["input"])
        return "instruction", [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}], None
    if "text" in record:
        if not isinstance(record["text"], str):
            raise LmforgeError(f"{where}: 'text' must be a string")
        return "text", None, record["text"]
    raise LmforgeError(
        f"{where}: unrecognised record (fields: {', '.join(map(repr, sorted(record))) or 'none'}); expected messages, "
        "conversations, instruction/output or text"
    )


def _check_chat(messages: list[dict], where: str) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LmforgeError(f"{where}: message {i} needs 'role' and 'content'")
        if m["role"] == "assistant" and not str(m["content"]).strip():
            raise LmforgeError(f"{where}: message {i} is an empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise LmforgeError(f"{where}: no assistant turn to learn from")


def load_examples(path: str | Path, tokenizer: Tokenizer, *, block_size: int, fmt: DataFormat = "auto",
                  overlong: Overlong = "truncate") -> tuple[list[Example], SFTStats]:
    """Read a .jsonl (chat / instruction / text records) or a plain text file into examples."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file")
    stats = SFTStats()
    if path.suffix != ".jsonl":
        if fmt not in ("auto", "text"):
            raise LmforgeError(f"{path}: --data-format {fmt} needs a .jsonl file")
        stats.format = "text"
        return _text_examples(path.read_text(encoding="utf-8", errors="replace"), str(path), tokenizer, block_size, stats), stats
    examples, texts = [], []
    seen_formats = set()
    for lineno, record in read_jsonl(path, allow_empty=True):
        where = f"{path}:{lineno}"
        kind, messages, text = record_to_messages(record, where)
        if fmt != "auto" and kind != fmt:
            raise LmforgeError(f"{where}: a {kind} record in --data-format {fmt} data")
        seen_formats.add(kind)
        if kind == "text":
            texts.append((text, where))
            continue
        _check_chat(messages, where)
        try:
            rendered = render_chat(tokenizer, messages)
        except LmforgeError as e:
            raise LmforgeError(f"{where}: {e}") from None
        # +1: the window holds the inputs and, shifted by one, the targets.
        ids, mask = rendered.ids, rendered.loss_mask
        if len(ids) > block_size + 1:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids, mask = ids[: block_size + 1], mask[: block_size + 1]
            stats.truncated += 1
            if not any(mask[1:]):
                stats.dropped += 1  # truncation removed every assistant token
                continue
        examples.append(Example(ids, mask, where))
    if len(seen_formats) > 1:
        raise LmforgeError(f"{path}: mixes record formats ({', '.join(sorted(seen_formats))}); use one per file")
    stats.format = next(iter(seen_formats), "empty")
    if texts:
        examples = _text_examples("".join(t for t, _ in texts), str(path), tokenizer, block_size, stats, docs=texts)
    if not examples:
        raise LmforgeError(f"{path}: no examples (after dropping {stats.dropped} overlong ones)" if stats.dropped else f"{path}: no examples")
    stats.examples = len(examples)
    stats.total_tokens = sum(len(e.ids) for e in examples)
    stats.trained_tokens = sum(sum(e.mask[1:]) for e in examples)
    return examples, stats


def _text_examples(text: str, source: str, tokenizer: Tokenizer, block_size: int, stats: SFTStats,
                   docs: list[tuple[str, str]] | None = None) -> list[Example]:
    """Continued pretraining: documents joined by eos, cut into windows of block_size + 1."""
    eos = tokenizer.eos_id
    ids: list[int] = []
    for doc, _where in docs or [(text, source)]:
        ids += tokenizer.encode(doc)
        if eos is not None:
            ids.append(eos)
    window = block_size + 1
    examples = [Example(ids[i : i + window], [True] * len(ids[i : i + window]), f"{source}@{i}")
                for i in range(0, max(1, len(ids) - 1), block_size)]
    examples = [e for e in examples if len(e.ids) > 1]
    stats.examples = len(examples)
    stats.total_tokens = stats.trained_tokens = sum(len(e.ids) for e in examples)
    return examples


def split_examples(examples: list[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """Hold out every k-th example (spread evenly, deterministic)."""
    if not 0.0 <= val_fraction < 1.0:
        raise LmforgeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    val_idx = {i for i in range(len(examples)) if int((i + 1) * val_fraction) > int(i * val_fraction)}
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    if val_fraction > 0 and not val:
        raise LmforgeError(f"{len(examples)} examples are too few for --val-fraction {val_fraction}; give --val-data")
    if not train:
        raise LmforgeError("no training examples left after the val split")
    return train, val


@dataclass
class SFTBatches:
    """Batches for the Trainer: shuffled each epoch by a seed (a pure function of the step, so
    resuming is exact), right-padded, targets -100 outside the loss mask. With `pack`, short
    examples share a row, each attending only to itself (block-diagonal mask, positions reset)."""

    train: list[Example]
    val: list[Example]
    batch_size: int
    grad_accum: int
    pad_id: int
    seed: int
    pack: bool = False
    block_size: int = 0
    rank: int = 0  # with several ranks, batch_size is per rank: each takes its slice of the step's rows
    world_size: int = 1
    _rows: list[list[Example]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.pack:
            self._rows = _pack_rows(self.train, self.block_size + 1)
        else:
            self._rows = [[e] for e in self.train]

    @property
    def rows_per_epoch(self) -> int:
        return len(self._rows)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._rows))

    def rows_at(self, step: int, micro: int) -> list[list[Example]]:
        """The rows (each one example, or several packed) of micro-batch `micro` of `step`."""
        n = len(self._rows)
        start = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        rows = []
        for k in range(start, start + self.batch_size):
            epoch, i = divmod(k, n)
            rows.append(self._rows[self._order(epoch)[i]])
        return rows

    def train_batch(self, step: int, micro: int):
        return collate(self.rows_at(step, micro), self.pad_id)

    def val_batches(self) -> Iterator:
        for i in range(0, len(self.val), self.batch_size):
            yield collate([[e] for e in self.val[i : i + self.batch_size]], self.pad_id)


def _pack_rows(examples: list[Example], window: int) -> list[list[Example]]:
    """First-fit-decreasing packing of examples into rows of at most `window` tokens."""
    rows: list[list[Example]] = []
    space: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.ids)):
        for r, free in enumerate(space):
            if len(e.ids) <= free:
                rows[r].append(e)
                space[r] -= len(e.ids)
                break
        else:
            rows.append([e])
            space.append(window - len(e.ids))
    return rows


def collate(rows: list[list[Example]], pad_id: int):
    """[B, T] inputs and targets (next token, -100 where not trained), plus a block-diagonal mask
    and per-example positions when a row holds several examples."""
    lengths = [sum(len(e.ids) for e in row) - 1 for row in rows]
    T = max(lengths)
    B = len(rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), -100, dtype=torch.long)
    packed = any(len(row) > 1 for row in rows)
    seg = torch.full((B, T), -1, dtype=torch.long) if packed else None
    pos = torch.zeros((B, T), dtype=torch.long) if packed else None
    for b, row in enumerate(rows):
        ids = [i for e in row for i in e.ids]
        mask = [m for e in row for m in e.mask]
        n = len(ids) - 1
        x[b, :n] = torch.tensor(ids[:-1])
        tgt = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:])
        y[b, :n] = torch.where(keep, tgt, torch.full_like(tgt, -100))
        if packed:
            offset = 0
            for k, e in enumerate(row):
                span = min(len(e.ids), T - offset)  # the row's last token is a target only
                seg[b, offset : offset + span] = k
                pos[b, offset : offset + span] = torch.arange(span)
                offset += len(e.ids)
            # The last token of one example must not be trained to predict the next example's first.
            ends = np.cumsum([len(e.ids) for e in row])[:-1] - 1
            for end in ends:
                if end < T:
                    y[b, end] = -100
    if not packed:
        return x, y
    seg_in = seg[:, :T]
    attn = seg_in[:, None, :, None] == seg_in[:, None, None, :]  # [B, 1, T, T], causal added by the model
    attn &= (seg_in >= 0)[:, None, None, :]
    return x, y, {"positions": pos[:, :T], "attn_mask": attn}
