"""`lmforge serve` with no MODEL: the embedded SmolLM2-135M-Instruct (its quantized GGUF weights,
as shipped), as a user starts it. Temperature 0 returns exactly `lmforge generate`'s text, for a
request alone and for one inside a busy batch; the chat endpoint uses the model's own template.

    .venv/bin/pytest -m slow tests/test_serve_smollm2.py
"""

from __future__ import annotations

import signal
import time

import pytest

from conftest import lmforge_test_home
from serveutil import ServerProcess, busy_batch

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

NAME = "smollm2-135m-instruct"
PROMPT = "The three most useful modules of the Python standard library are"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from lmforge_test_home(tmp_path_factory)


@pytest.fixture(scope="module")
def url(home, tmp_path_factory):
    server = ServerProcess(None, tmp_path_factory.mktemp("serve") / "serve.log", env={"LMFORGE_HOME": str(home)})
    try:
        yield server.wait_ready(timeout=600).url.rstrip("/")  # the first use downloads the package (~93 MB)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_default_model_greedy_text_equals_lmforge_generate_alone_and_busy(url, cli):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [NAME]
    want = cli("generate", NAME, PROMPT, "--temperature", "0", "--max-new-tokens", "48", "--no-stream")
    assert want.code == 0, want.err
    alone = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=48, temperature=0).choices[0].text
    assert alone == want.out[:-1] and alone.strip()
    with busy_batch(client, NAME, 7, max_tokens=200):
        time.sleep(1.0)
        busy = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=48, temperature=0).choices[0].text
    assert busy == alone


def test_default_model_chats_through_its_template(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=40, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # ended by its end-of-turn token, not the length
