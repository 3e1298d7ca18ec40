"""OpenAI's request shapes for /v1/chat/completions and /v1/completions, checked field by field,
and OpenAI's error JSON. What a request asks for is either done or refused with a 400 that names
the field: a parameter that lmforge does not implement is never silently ignored.

Beside OpenAI's fields, vLLM's common extensions are accepted (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens), so the clients and benchmarks written for vLLM work unchanged.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # Fields a client sends that neither OpenAI's API nor lmforge knows are kept (and logged by
    # the server), as OpenAI-compatible servers do: clients add vendor fields freely.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: dict | None = None
    stop: Union[str, list[str], None] = Field(None, validate_default=True)  # a list after validation
    seed: StrictInt | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("a stop string cannot be empty")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v is not None:
            unknown = set(v) - {"include_usage", "continuous_usage_stats"}
            if unknown:
                raise ValueError(f"unknown stream_options {sorted(unknown)}")
            if not isinstance(v.get("include_usage", False), bool):
                raise ValueError("include_usage must be a boolean")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict[str, Any]], None]
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text; content parts must all be text (no images or audio here)."""
        if self.content is None:
            raise ApiError(400, f"messages[{index}].content is required", param=f"messages[{index}].content")
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content[{j}]: only text parts are supported "
                               f"(got type {part.get('type')!r})", param=f"messages[{index}].content")
            pieces.append(part["text"])
        return "".join(pieces)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ApiError(400, f"{name} (function calling) is not supported by this server", param=name,
                               code="unsupported_parameter")
        if self.tool_choice not in (None, "none"):
            raise ApiError(400, "tool_choice is not supported by this server", param="tool_choice",
                           code="unsupported_parameter")
        if self.response_format and self.response_format.get("type") != "text":
            raise ApiError(400, f"response_format {self.response_format.get('type')!r} is not supported "
                           "(only 'text')", param="response_format", code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", param="max_tokens")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        """None: no log-probs; k >= 0: the picked token's and the k most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # the legacy API's k (at most 5)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = Field(None, ge=1)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by this server", param="suffix",
                           code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported by this server", param="best_of",
                           code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo with logprobs (prompt log-probs) is not supported by this server",
                           param="echo", code="unsupported_parameter")

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids; OpenAI's four shapes."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse(cls: type[_Request], data: Any) -> _Request:
    """Validate a decoded JSON body; a bad field is a 400 naming it, as OpenAI answers."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = cls.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        field = str(first["loc"][0]) if first["loc"] else "body"
        if first["type"] == "missing":
            raise ApiError(400, f"missing required parameter '{field}'", param=field,
                           code="missing_required_parameter") from None
        # A field of several accepted types fails once per type: name the field, not a branch.
        branches = [x for x in errors if x["loc"] and str(x["loc"][0]) == field]
        where = field if len(branches) > 1 else ".".join(str(x) for x in first["loc"])
        why = "not one of the accepted types" if len(branches) > 1 else first["msg"]
        raise ApiError(400, f"invalid value for '{where}': {why} (got {_short(first.get('input'))})",
                       param=field, code="invalid_value") from None
    request.refuse_unsupported()
    return request
