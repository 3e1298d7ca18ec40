"""The HTTP side of `lmforge serve`, in a process of its own: uvicorn on its main thread, the
requests passed to the generation loop through a pipe (serve.link.PipeLink). It never imports
torch: it tokenizes, renders chat templates, validates and writes."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from lmforge.serve.config import ServeConfig


@dataclass
class HttpSpec:
    """What the HTTP process needs to know of the model, sent to it at its start."""

    config: ServeConfig
    tokenizer_json: bytes
    tokenizer_config: dict
    generation: dict
    vocab_size: int
    max_len: int


def http_main(conn, spec: HttpSpec) -> None:
    import uvicorn
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.serve.app import Server, create_app
    from lmforge.serve.link import PipeLink
    from lmforge.serve.metrics import ServeMetrics
    from lmforge.serve.tickets import Admission
    from lmforge.tokenizer import Tokenizer

    # Its own process group: Ctrl-C at a terminal reaches the main process alone, which passes it
    # on once per press (a second press stops at once, as uvicorn does).
    os.setpgid(0, 0)
    config = spec.config
    logging.basicConfig(level=config.log_level.upper(), format="lmforge serve: %(message)s")
    tokenizer = Tokenizer(HFTokenizer.from_str(spec.tokenizer_json.decode("utf-8")), spec.tokenizer_config,
                          spec.tokenizer_json)
    metrics = ServeMetrics()
    web: uvicorn.Server | None = None

    def lost() -> None:  # the generation process is gone: nothing left to serve
        if web is not None:
            web.should_exit = True

    link = PipeLink(conn, metrics, Admission(config.max_batch, config.max_queue), on_lost=lost)

    async def open_(loop) -> None:
        link.start(loop)

    server = Server(config, tokenizer, spec.generation, spec.vocab_size, spec.max_len, link, metrics, open_, link.close)
    host = f"[{config.host}]" if ":" in config.host else config.host
    base = f"http://{host}:{config.port}"

    def announce(text: str) -> None:
        print(f"lmforge serve: {text}\n  chat page: {base}/\n  OpenAI API: {base}/v1  (e.g. {base}/v1/chat/completions)",
              file=sys.stderr, flush=True)

    web = uvicorn.Server(uvicorn.Config(create_app(server, announce=announce), host=config.host, port=config.port,
                                        log_level=config.log_level, timeout_graceful_shutdown=config.drain_seconds,
                                        access_log=False))
    try:
        web.run()
    except KeyboardInterrupt:  # uvicorn hands Ctrl-C back once it has drained: the normal way to stop
        pass
    if not web.started:
        sys.exit(3)
