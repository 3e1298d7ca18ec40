"""`lmforge serve`: the chatbot as a service (an OpenAI-compatible API and a chat page)."""

from __future__ import annotations

import sys

from lmforge.serve.config import DEFAULT_MODEL, ServeConfig

__all__ = ["DEFAULT_MODEL", "ServeConfig", "run_server"]


def run_server(config: ServeConfig, notify=lambda text: print(text, file=sys.stderr, flush=True)) -> None:
    """Load the model and warm it up; start the HTTP process; generate on this thread until the
    HTTP process ends. Ctrl-C (or SIGTERM) stops taking connections and lets in-flight requests
    finish for up to `config.drain_seconds`; a second Ctrl-C stops at once."""
    import multiprocessing
    import os
    import signal

    from lmforge.errors import LmforgeError
    from lmforge.generate.engine import Engine
    from lmforge.interop.registry import load_model
    from lmforge.serve.app import context_served
    from lmforge.serve.http_process import HttpSpec, http_main
    from lmforge.serve.link import PipeInbox, PipeOutbox
    from lmforge.serve.worker import GenerationWorker

    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        notify(f"lmforge: warning: listening on {config.host} without an API key: anyone who can reach this "
               "port can use the model (give --api-key or --api-key-file)")
    loaded = load_model(config.model)
    engine = Engine(loaded.model, loaded.tokenizer, stop_token_ids=loaded.generation.get("stop_token_ids", ()),
                    int8_activations=config.int8_activations)
    max_len = context_served(config, loaded.model.config.block_size)
    worker = GenerationWorker(engine, max_batch=config.max_batch, max_len=max_len, prefill_chunk=config.prefill_chunk,
                              reuse_prefix=config.prefix_reuse)
    worker.warm_up()
    tok = loaded.tokenizer
    spec = HttpSpec(config, tok.hf.to_str().encode("utf-8"), tok.config, dict(loaded.generation),
                    loaded.model.config.vocab_size, max_len)
    here, there = multiprocessing.Pipe()
    http = multiprocessing.get_context("spawn").Process(target=http_main, args=(there, spec), name="lmforge-http")
    http.start()
    there.close()
    stopping = []

    def on_signal(signum, frame):
        if not stopping:
            notify("lmforge serve: stopping: finishing the requests in flight (Ctrl-C again to stop now)")
        stopping.append(signum)
        if http.is_alive():
            os.kill(http.pid, signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.run(PipeInbox(here), PipeOutbox(here, config.stream_interval_ms / 1000), until=lambda: not http.is_alive())
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if http.is_alive():
            http.kill()
    if http.exitcode and not stopping:
        raise LmforgeError(f"the HTTP server stopped (exit code {http.exitcode}); could it listen on "
                           f"{config.host}:{config.port}? See the error above")
    notify("lmforge serve: stopped")
