"""`lmforge serve`: an OpenAI-compatible HTTP server on the Engine, with continuous batching.

    POST /v1/chat/completions, /v1/completions   (stream or not)
    GET  /v1/models, /health, /metrics (Prometheus), /  (the chat page)

The event loop only parses, validates and writes; the generation loop (serve.worker) owns the
model — in `lmforge serve` on the main thread of a process of its own (serve.link). Every error
is OpenAI's error JSON with the status OpenAI would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from lmforge.errors import LmforgeError
from lmforge.serve.completions import Shape, plan_chat, plan_completion, respond, stream
from lmforge.serve.config import ServeConfig
from lmforge.serve.link import ThreadLink
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse
from lmforge.serve.tickets import Admission, Ticket
from lmforge.tokenizer import Tokenizer

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"
DEFAULT_CONTEXT = 2048  # the context served when the model's is longer and --max-model-len is not given
_PROTECTED = ("/v1/", "/metrics")  # what the API key guards; the page and /health stay open


@dataclass
class Server:
    """What the HTTP side knows of the model (no torch here: in `lmforge serve` this side is a
    process of its own) and its link to the generation loop. `open`/`close` run at the app's
    start and end, on its event loop."""

    config: ServeConfig
    tokenizer: Tokenizer
    generation: dict  # sampling defaults from the model dir's generation.json
    vocab_size: int
    max_len: int  # the context served
    link: object  # serve.link.ThreadLink or PipeLink
    metrics: ServeMetrics
    open: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]
    close: Callable[[], None]
    started: int = field(default_factory=lambda: int(time.time()))


def context_served(config: ServeConfig, block_size: int) -> int:
    if config.max_model_len is not None and config.max_model_len > block_size:
        raise LmforgeError(f"--max-model-len {config.max_model_len} exceeds the model's context of {block_size} tokens")
    return config.max_model_len or min(block_size, DEFAULT_CONTEXT)


def build_server(config: ServeConfig, loaded) -> Server:
    """A server whose generation loop runs on a thread of this process (tests, notebooks)."""
    from lmforge.generate.engine import Engine
    from lmforge.serve.worker import GenerationWorker, QueueInbox, start_thread

    engine = Engine(loaded.model, loaded.tokenizer, stop_token_ids=loaded.generation.get("stop_token_ids", ()),
                    int8_activations=config.int8_activations)
    max_len = context_served(config, loaded.model.config.block_size)
    worker = GenerationWorker(engine, max_batch=config.max_batch, max_len=max_len, prefill_chunk=config.prefill_chunk,
                              reuse_prefix=config.prefix_reuse)
    metrics, inbox = ServeMetrics(), QueueInbox()
    link = ThreadLink(inbox, metrics, Admission(config.max_batch, config.max_queue))
    threads = []

    async def open_(loop):
        link.loop = loop
        await asyncio.to_thread(worker.warm_up)
        threads.append(start_thread(worker, inbox, link))

    def close():
        inbox.put(("stop", 0, None))
        for t in threads:
            t.join(10)

    return Server(config, loaded.tokenizer, loaded.generation, loaded.model.config.vocab_size, max_len, link, metrics,
                  open_, close)


def create_app(server: Server, *, announce=None) -> FastAPI:
    """The ASGI app. `announce(text)` is called once the model is warm and requests are served."""
    cfg = server.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.open(asyncio.get_running_loop())
        if announce:
            announce(f"serving {cfg.name} (context {server.max_len} tokens, {cfg.max_batch} sequences at once)")
        yield
        server.close()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """The API key (constant-time compare), then a count of the answer by endpoint and status."""
        path = request.url.path
        if cfg.api_key and request.method != "OPTIONS" and path.startswith(_PROTECTED):
            given = request.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
                e = ApiError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                             code="invalid_api_key")
                server.metrics.requests.labels(_endpoint(path), "401").inc()
                return JSONResponse(e.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        server.metrics.requests.labels(_endpoint(path), str(response.status_code)).inc()
        return response

    if cfg.cors_origins:  # added last: the outermost layer, so 401s carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": cfg.name, "object": "model", "created": server.started, "owned_by": "lmforge",
                "max_model_len": server.max_len, "context_length": server.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != cfg.name:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatCompletionRequest, await _read_json(request, cfg.max_body_bytes))
        _log_unknown(req)
        return await _complete(server, request, req, plan_chat(req, server), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await _read_json(request, cfg.max_body_bytes))
        _log_unknown(req)
        return await _complete(server, request, req, plan_completion(req, server), chat=False)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# The page shows model output: only its own scripts may run, whatever a reply contains.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                            "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _endpoint(path: str) -> str:
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")
    return path if path in known else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")


def _log_unknown(req) -> None:
    if req.model_extra:
        log.warning("ignoring unknown request fields: %s", ", ".join(sorted(req.model_extra)))


async def _read_json(request: Request, limit: int):
    """The body as JSON, at most `limit` bytes (413 past it, before reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds this server's limit of {limit} bytes",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds this server's limit of {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"could not parse the JSON body: {e}", code="invalid_json") from None


async def _complete(server: Server, request: Request, req, plan, *, chat: bool):
    ticket = Ticket(plan.sequences, asyncio.get_running_loop())
    server.link.submit(ticket)  # 429 when the queue is full
    server.metrics.prompt_tokens.inc(plan.prompt_tokens)
    shape = Shape(chat, server.tokenizer, server.config.name)
    if req.stream:
        async def events():
            try:
                async for piece in stream(plan, ticket, shape, req.include_usage):
                    yield piece
            finally:  # the client closed the stream (or it ended): stop generating for it
                server.link.cancel(ticket)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def client_gone() -> None:  # the body is read: what the server receives next is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    try:
        return await respond(plan, ticket, shape, client_gone)
    except ConnectionAbortedError:
        return Response(status_code=499)  # nobody is listening; the status is for the log and metrics
    finally:
        server.link.cancel(ticket)
