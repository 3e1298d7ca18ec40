"""Helpers for the tests of `lmforge serve`: a server process on a free loopback port, and a
batch kept busy by other clients."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, key: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class ServerProcess:
    """`python -m lmforge serve [MODEL] OPTIONS` on a free loopback port, its output in a log file.
    MODEL None: the command's default (the embedded SmolLM2)."""

    def __init__(self, model: Path | str | None, log: Path, *options: str, api_key: str | None = None,
                 env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.api_key = api_key
        self.log_path = log
        self._log = open(log, "wb")
        cmd = [sys.executable, "-m", "lmforge", "serve", *([str(model)] if model is not None else []),
               "--host", "127.0.0.1", "--port", str(self.port), *options]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"lmforge serve exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}",
                            pytrace=False)
            try:
                status, body = http_get(self.url + "health", timeout=2)
                if status == 200 and json.loads(body).get("status") == "ok":
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        pytest.fail(f"lmforge serve not ready on {self.url}health after {timeout:.0f} s:\n{self.log_tail()}",
                    pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()

    def model_id(self) -> str:
        if not hasattr(self, "_model_id"):
            status, body = http_get(self.url + "v1/models", self.api_key)
            assert status == 200, body
            self._model_id = json.loads(body)["data"][0]["id"]
        return self._model_id

    def metric(self, name: str) -> float:
        status, body = http_get(self.url + "metrics", self.api_key)
        assert status == 200, body
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics")


@contextlib.contextmanager
def busy_batch(client, model: str, n: int, max_tokens: int, **extra):
    """n sampled chat streams (seeds 0..n-1) run while the block runs; closed after it."""
    stop = threading.Event()

    def stream(i):
        s = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Tell a story {i}."}],
                                           max_tokens=max_tokens, temperature=0.8, seed=i, stream=True, **extra)
        for _ in s:
            if stop.is_set():
                s.close()
                return

    with ThreadPoolExecutor(n) as pool:
        jobs = [pool.submit(stream, i) for i in range(n)]
        try:
            yield
        finally:
            stop.set()
            for j in jobs:
                j.result()
