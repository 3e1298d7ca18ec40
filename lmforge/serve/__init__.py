"""`lmforge serve`: the chatbot as a service (an OpenAI-compatible API and a chat page)."""

from __future__ import annotations

import sys

from lmforge.serve.config import DEFAULT_MODEL, ServeConfig

__all__ = ["DEFAULT_MODEL", "ServeConfig", "run_server"]


def run_server(config: ServeConfig, notify=lambda text: print(text, file=sys.stderr, flush=True)) -> None:
    """Load the model, listen, serve until Ctrl-C (or SIGTERM); then stop taking connections and
    let in-flight requests finish for up to `config.drain_seconds` before exiting."""
    import logging

    import uvicorn

    from lmforge.interop.registry import load_model
    from lmforge.serve.app import build_server, create_app

    logging.basicConfig(level=config.log_level.upper(), format="lmforge serve: %(message)s")
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        notify(f"lmforge: warning: listening on {config.host} without an API key: anyone who can reach this "
               "port can use the model (give --api-key or --api-key-file)")
    loaded = load_model(config.model)
    server = build_server(config, loaded)
    host = f"[{config.host}]" if ":" in config.host else config.host
    base = f"http://{host}:{config.port}"

    def announce(text: str) -> None:
        notify(f"lmforge serve: {text}\n  chat page: {base}/\n  OpenAI API: {base}/v1  (e.g. {base}/v1/chat/completions)")

    app = create_app(server, announce=announce)
    try:
        uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                      timeout_graceful_shutdown=config.drain_seconds, access_log=False)).run()
    except KeyboardInterrupt:  # uvicorn drained the requests, then hands Ctrl-C back: the normal way to stop
        pass
    notify("lmforge serve: stopped")
