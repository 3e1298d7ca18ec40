"""From an OpenAI request to the worker's sequences, and from the worker's events to OpenAI's
response objects: whole (`respond`) or as server-sent events (`stream`), for both endpoints.

The two endpoints differ only in how the prompt is given (messages through the model's chat
template, or text / token ids) and in the shape of a choice (`message`/`delta` with log-probs per
token, or `text` with the legacy log-prob arrays): `Shape` holds those differences.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from lmforge.chat import render_chat
from lmforge.errors import LmforgeError
from lmforge.generate.events import Event
from lmforge.generate.params import SamplingParams
from lmforge.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from lmforge.serve.tickets import Sequence, Ticket


@dataclass
class Plan:
    """A validated request: its sequences (prompt i's choice j at index i * n + j), the prompts'
    token counts and, for echo, the prompt texts."""

    sequences: list[Sequence]
    prompt_tokens: int
    n: int
    echo: list[str] = field(default_factory=list)


def plan_chat(req: ChatCompletionRequest, server) -> Plan:
    cfg, tokenizer = server.config, server.tokenizer
    if len(req.messages) > cfg.max_messages:
        raise ApiError(400, f"{len(req.messages)} messages exceed this server's limit of {cfg.max_messages}",
                       param="messages", code="too_many_messages")
    conversation = req.conversation()
    _check_chars(sum(len(m["content"]) for m in conversation), cfg.max_prompt_chars, "messages")
    if not tokenizer.chat_template:
        raise ApiError(400, f"the model {cfg.name} has no chat template (none in its tokenizer files or GGUF "
                       "metadata), so it cannot take messages; use /v1/completions with a plain prompt",
                       param="messages", code="no_chat_template")
    try:
        ids = render_chat(tokenizer, conversation, add_generation_prompt=True).ids
    except LmforgeError as e:  # the template refused the conversation (roles out of order, ...)
        raise ApiError(400, f"messages: {e}", param="messages") from None
    return _plan(req, server, [ids], prompt_field="messages")


def plan_completion(req: CompletionRequest, server) -> Plan:
    cfg, tokenizer = server.config, server.tokenizer
    prompts = req.prompts()
    _check_chars(sum(len(p) for p in prompts if isinstance(p, str)), cfg.max_prompt_chars, "prompt")
    vocab = server.vocab_size
    ids_list, texts = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ApiError(400, f"prompt[{i}] is empty", param="prompt")
            ids = tokenizer.encode(p)
            texts.append(p)
        else:
            if not p or any(not 0 <= t < vocab for t in p):
                raise ApiError(400, f"prompt[{i}]: token ids must be a non-empty list of ids in [0, {vocab})",
                               param="prompt")
            ids = list(p)
            texts.append(tokenizer.decode(ids))
        ids_list.append(ids)
    plan = _plan(req, server, ids_list, prompt_field="prompt")
    if req.echo:
        plan.echo = texts
    return plan


def _check_chars(n: int, limit: int, param: str) -> None:
    if n > limit:
        raise ApiError(400, f"{param}: {n} characters exceed this server's limit of {limit}", param=param,
                       code="prompt_too_long")


def _plan(req, server, prompts: list[list[int]], prompt_field: str) -> Plan:
    cfg, generation = server.config, server.generation
    if req.n > cfg.max_n:
        raise ApiError(400, f"n={req.n} exceeds this server's limit of {cfg.max_n}", param="n")
    if req.model is not None and req.model != cfg.name:
        raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{cfg.name}'",
                       param="model", code="model_not_found")
    limit = req.token_limit
    if limit is not None and cfg.max_tokens_limit is not None and limit > cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens={limit} exceeds this server's limit of {cfg.max_tokens_limit}",
                       param="max_tokens")
    sequences = []
    for ids in prompts:
        room = server.max_len - len(ids)
        want = limit if limit is not None else min(room, cfg.max_tokens_limit or room)
        if want < 1 or len(ids) + want > server.max_len:
            raise ApiError(400, f"This model's maximum context length is {server.max_len} tokens. However, you "
                           f"requested {len(ids) + max(want, 1)} tokens ({len(ids)} in the {prompt_field}, "
                           f"{max(want, 1)} in the completion). Please reduce the length of the {prompt_field} "
                           "or completion.", param=prompt_field, code="context_length_exceeded")
        for j in range(req.n):
            sequences.append(Sequence(ids, _sampling(req, want, j, generation), req.logprobs_k))
    return Plan(sequences, sum(len(p) for p in prompts), req.n)


def _sampling(req, max_new: int, choice: int, generation: dict) -> SamplingParams:
    """OpenAI's defaults (temperature 1, no top-k), except where the model dir's generation.json
    names its own, as `lmforge generate` takes them; the request's values win."""

    def pick(value, key, default):
        return value if value is not None else generation.get(key, default)

    top_k = pick(req.top_k, "top_k", 0)
    if req.min_tokens > max_new:
        raise ApiError(400, f"min_tokens={req.min_tokens} is more than the {max_new} tokens the completion may have",
                       param="min_tokens")
    try:
        return SamplingParams(
            max_new_tokens=max_new, temperature=pick(req.temperature, "temperature", 1.0),
            top_k=0 if top_k < 0 else top_k, top_p=pick(req.top_p, "top_p", 1.0), min_p=pick(req.min_p, "min_p", 0.0),
            repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0),
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, stop=list(req.stop),
            seed=None if req.seed is None else req.seed + choice, min_new_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos)
    except LmforgeError as e:
        raise ApiError(400, str(e)) from None


# -- responses -------------------------------------------------------------------------------

@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0
    cached: int = 0  # prompt tokens found in the KV cache
    logprobs: list[Event] = field(default_factory=list)


class Shape:
    """How one endpoint writes choices. `chat` = /v1/chat/completions, else /v1/completions."""

    def __init__(self, chat: bool, tokenizer, model: str):
        self.chat, self.tokenizer, self.model = chat, tokenizer, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def logprobs(self, events: list[Event], offset: int = 0) -> dict | None:
        if not events:
            return None
        if self.chat:
            def entry(tok, lp):
                return {"token": self._token(tok), "logprob": lp, "bytes": list(self.tokenizer.token_bytes(tok))}

            return {"content": [{**entry(e.token_id, e.logprob),
                                 "top_logprobs": [entry(t, lp) for t, lp in (e.top_logprobs or [])]} for e in events],
                    "refusal": None}
        tokens = [self._token(e.token_id) for e in events]
        offsets, at = [], offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{self._token(t): lp for t, lp in (e.top_logprobs or [])} for e in events],
                "text_offset": offsets}

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None, *, delta: bool,
               first: bool = False) -> dict:
        if self.chat:
            if delta:
                body = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": finish_reason}
            return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def envelope(self, choices: list[dict], *, chunk: bool, usage: dict | None = None, with_usage: bool = False) -> dict:
        body = {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model, "system_fingerprint": "lmforge", "choices": choices}
        if usage is not None or with_usage:
            body["usage"] = usage
        return body


def usage(plan: Plan, completion_tokens: int, cached: list[int]) -> dict:
    """OpenAI's usage object. cached: each sequence's prompt tokens found in the KV cache; a
    prompt's count is the least of its n choices' (each choice prefills the prompt on its own)."""
    cached_tokens = sum(min(cached[i : i + plan.n]) for i in range(0, len(cached), plan.n))
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": plan.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _reason(event: Event) -> str:
    # "cancelled" reaches a response only when the server itself gave up (shutting down).
    return event.finish_reason if event.finish_reason in ("stop", "length") else "stop"


async def respond(plan: Plan, ticket: Ticket, shape: Shape, client_gone: Callable[[], Awaitable[None]]) -> dict:
    """Wait for every sequence; the whole response. `client_gone()` returns when the client
    disconnects: then the work stops (ConnectionAbortedError) instead of running to its end."""
    import asyncio

    choices = [_Choice() for _ in plan.sequences]

    async def collect() -> None:
        left = len(choices)
        while left:
            index, item = await ticket.events.get()
            if index < 0:
                raise item
            c = choices[index]
            c.text.append(item.text)
            c.tokens += item.sampled
            c.cached += item.cached
            if item.logprob is not None:
                c.logprobs.append(item)
            if item.finish_reason:
                c.finish_reason = _reason(item)
                left -= 1

    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        raise ConnectionAbortedError
    work.result()  # raises what the worker sent
    out = []
    for index, c in enumerate(choices):
        head = plan.echo[index // plan.n] if plan.echo else ""
        out.append(shape.choice(index, head + "".join(c.text), c.finish_reason,
                                shape.logprobs(c.logprobs, len(head)), delta=False))
    return shape.envelope(out, chunk=False, usage=usage(plan, sum(c.tokens for c in choices),
                                                        [c.cached for c in choices]))


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream(plan: Plan, ticket: Ticket, shape: Shape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text of any choice, a last chunk per choice with
    its finish_reason, the usage chunk when asked, then [DONE]. Text that could still turn out to
    start a stop string is held back by the batcher, so nothing sent is ever taken back."""
    tokens = 0
    cached = [0] * len(plan.sequences)
    offsets = [0] * len(plan.sequences)
    if shape.chat:  # OpenAI opens each choice with its role
        for index in range(len(plan.sequences)):
            yield sse(shape.envelope([shape.choice(index, "", None, None, delta=True, first=True)], chunk=True,
                                     with_usage=include_usage))
    elif plan.echo:
        for index in range(len(plan.sequences)):
            head = plan.echo[index // plan.n]
            offsets[index] = len(head)
            yield sse(shape.envelope([shape.choice(index, head, None, None, delta=True)], chunk=True,
                                     with_usage=include_usage))
    left = len(plan.sequences)
    pending: list[list[Event]] = [[] for _ in plan.sequences]  # log-probs waiting for text to go with
    texts = [""] * len(plan.sequences)  # text of events taken together, not yet sent

    def text_chunk(index: int) -> str:
        lp = shape.logprobs(pending[index], offsets[index])
        offsets[index] += len(texts[index])
        chunk = sse(shape.envelope([shape.choice(index, texts[index], None, lp, delta=True)], chunk=True,
                                   with_usage=include_usage))
        pending[index], texts[index] = [], ""
        return chunk

    while left:
        # Events that arrived together (the engine sends a few steps at once, see
        # link.PipeOutbox) go out as one chunk per choice: each chunk wakes the client too.
        batch = [await ticket.events.get()]
        while not ticket.events.empty():
            batch.append(ticket.events.get_nowait())
        for index, item in batch:
            if index < 0:
                yield sse(ApiError(item.status, item.message, type=item.type).body() if isinstance(item, ApiError)
                          else {"error": {"message": str(item), "type": "server_error", "param": None, "code": None}})
                return
            tokens += item.sampled
            cached[index] += item.cached
            if item.logprob is not None:
                pending[index].append(item)
            texts[index] += item.text
            if item.finish_reason:
                if texts[index] or pending[index]:
                    yield text_chunk(index)
                left -= 1
                yield sse(shape.envelope([shape.choice(index, "", _reason(item), None, delta=True)], chunk=True,
                                         with_usage=include_usage))
        for index in range(len(texts)):
            if texts[index]:
                yield text_chunk(index)
    if include_usage:
        yield sse(shape.envelope([], chunk=True, usage=usage(plan, tokens, cached)))
    yield sse("[DONE]")
