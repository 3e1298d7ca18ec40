"""Worker processes for `clean` and `pack` that leave Ctrl-C to the main process.

In a terminal, Ctrl-C sends SIGINT to every process of the foreground group: each pool worker
would raise KeyboardInterrupt and print its own traceback while the main process stops. Workers
are therefore started while SIGINT is ignored (an ignored signal stays ignored across exec, and
Python keeps it so), and the main process, which alone owns the output, stops cleanly and
terminates them. The cost: a Ctrl-C in the few milliseconds the pool takes to start is ignored
(press it again). Blocking SIGINT instead would hold it, but the signal is delivered to any
thread that does not block it (tqdm's monitor), and there, while ignored, it is lost all the same.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from multiprocessing.pool import Pool
from typing import Any, Callable


def spawn_pool(processes: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> Pool:
    """A "spawn" pool (no fork of a process holding threads and tokenizers) whose workers ignore Ctrl-C."""
    ctx = multiprocessing.get_context("spawn")
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return ctx.Pool(processes, initializer=initializer, initargs=initargs)
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return ctx.Pool(processes, initializer=initializer, initargs=initargs)
    finally:
        signal.signal(signal.SIGINT, handler)
