"""`lmforge serve` with no MODEL: the embedded SmolLM2-135M-Instruct (its quantized GGUF weights,
as shipped), as a user starts it. Temperature 0 returns exactly `lmforge generate`'s text, for a
request alone and for one inside a busy batch; the chat endpoint uses the model's own template.

    .venv/bin/pytest -m slow tests/test_serve_smollm2.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import lmforge_test_home

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

NAME = "smollm2-135m-instruct"
PROMPT = "The three most useful modules of the Python standard library are"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from lmforge_test_home(tmp_path_factory)


@pytest.fixture(scope="module")
def url(home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "LMFORGE_HOME": str(home)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # the first use downloads the package (~93 MB)
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        assert time.time() < deadline, "the server did not come up"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0


def test_default_model_greedy_text_equals_lmforge_generate_alone_and_busy(url, cli):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [NAME]
    want = cli("generate", NAME, PROMPT, "--temperature", "0", "--max-new-tokens", "48", "--no-stream")
    assert want.code == 0, want.err
    alone = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=48, temperature=0).choices[0].text
    assert alone == want.out[:-1] and alone.strip()

    stop = threading.Event()

    def background(i):
        s = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"Tell a story {i}."}],
                                           max_tokens=200, temperature=0.8, seed=i, stream=True)
        for _ in s:
            if stop.is_set():
                s.close()
                return

    with ThreadPoolExecutor(7) as pool:
        jobs = [pool.submit(background, i) for i in range(7)]
        time.sleep(1.0)
        busy = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=48, temperature=0).choices[0].text
        stop.set()
        for j in jobs:
            j.result()
    assert busy == alone


def test_default_model_chats_through_its_template(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=40, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # ended by its end-of-turn token, not the length
