"""Conversations -> token ids (+ a loss mask), through the model's own chat template.

This is the ONE place chats are rendered: the chat REPL, the pipeline, supervised fine-tuning and
the server all call `render_chat`, so a model is trained on exactly the layout it is prompted
with, and the end-of-turn token that stops generation is the one it learned to emit.

Templates are the Jinja templates of the Hugging Face ecosystem (`chat_template` in
tokenizer_config.json or GGUF metadata), rendered in a sandbox as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Sequence

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass
class RenderedChat:
    ids: list[int]
    loss_mask: list[bool]  # True on the tokens a model is trained to produce (assistant turns)
    text: str


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise LmforgeError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise LmforgeError(f"chat template does not compile: {e}") from None


def check_messages(messages: Sequence[dict], where: str = "messages") -> None:
    if not messages:
        raise LmforgeError(f"{where}: empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LmforgeError(f"{where}[{i}]: a message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise LmforgeError(f"{where}[{i}]: unknown role {m['role']!r} (use {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise LmforgeError(f"{where}[{i}]: content must be a string")


def render_text(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    template = tokenizer.chat_template
    if not template:
        raise LmforgeError(
            "this model has no chat template (tokenizer_config.json has no chat_template); "
            "use plain text prompts, or a model trained with chat tokens"
        )
    specials = {f"{r}_token": tokenizer.config.get(f"{r}_token") for r in ("bos", "eos", "pad", "unk")}
    specials = {k: (v.get("content") if isinstance(v, dict) else v) or "" for k, v in specials.items()}
    return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt, **specials)


def render_chat(tokenizer: Tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> RenderedChat:
    """Token ids of a conversation and a mask that is True on assistant turns' tokens.

    An assistant turn's span is what rendering the conversation through that turn adds after
    rendering everything before it with a generation prompt: its content and its end-of-turn
    marker, never the role header the template writes before it.
    """
    check_messages(messages)
    text = render_text(tokenizer, messages, add_generation_prompt)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_text(tokenizer, messages[:i], True) if i else ""
        through = render_text(tokenizer, messages[: i + 1], False)
        if not text.startswith(through) or not through.startswith(before):
            raise LmforgeError("chat template renders a conversation differently from its prefixes; "
                               "cannot locate assistant turns for the loss mask")
        spans.append((len(before), len(through)))
    enc = tokenizer.hf.encode(text, add_special_tokens=False)
    mask = []
    for start, end in enc.offsets:
        # A token belongs to a turn when it starts inside it (byte-level tokens can overlap edges).
        mask.append(any(s <= start < e for s, e in spans) if end > start else False)
    return RenderedChat(enc.ids, mask, text)
