"""What `lmforge serve` is told: the model, where to listen, who may call, and the limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import LmforgeError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class ServeConfig:
    model: str = DEFAULT_MODEL  # a model dir, run dir, adapter dir or known model name
    served_model_name: str | None = None  # the id clients send and /v1/models lists (default: MODEL)
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None  # when set, /v1 and /metrics need `Authorization: Bearer KEY`
    max_batch: int = 8  # sequences decoded together (slots of the KV cache)
    max_queue: int = 64  # sequences waiting for a slot; more are answered 429
    max_model_len: int | None = None  # context served: prompt + completion (default: the model's, at most 2048)
    max_tokens_limit: int | None = None  # the most tokens one completion may ask for (default: the context)
    max_n: int = 8  # the most choices (n) one request may ask for
    max_messages: int = 256  # messages in one chat request
    max_prompt_chars: int = 200_000  # characters of prompt text in one request
    max_body_bytes: int = 2 << 20  # request body size; larger is answered 413
    prefill_chunk: int = 512  # prompt tokens prefilled per step beside the running decode batch
    prefix_reuse: bool = True  # a newcomer's prompt continues a finished request's cached prefix (batcher)
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API
    drain_seconds: float = 30.0  # on Ctrl-C: how long in-flight requests may take to finish
    int8_activations: bool = False  # quantized models: llama.cpp's int8 products (faster batches)
    stream_interval_ms: float = 40.0  # text of a stream is sent at most this often (first token and end at once)
    log_level: str = "info"

    def __post_init__(self) -> None:
        positive = ("port", "max_batch", "max_n", "max_messages", "max_prompt_chars", "max_body_bytes", "prefill_chunk")
        for name in positive:
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise LmforgeError(f"--max-queue must be >= 0, got {self.max_queue}")
        for name in ("max_model_len", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.api_key is not None and not self.api_key.strip():
            raise LmforgeError("the API key is empty")
        if self.stream_interval_ms < 0:
            raise LmforgeError(f"--stream-interval must be >= 0 ms, got {self.stream_interval_ms}")
        if self.drain_seconds < 0:
            raise LmforgeError(f"--drain-seconds must be >= 0, got {self.drain_seconds}")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model
