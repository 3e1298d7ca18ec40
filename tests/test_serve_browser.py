"""The chat page of `lmforge serve` (lmforge/serve/static/) in a real browser.

Headless Debian chromium + chromedriver (/usr/bin) driven by Selenium, against the real server
started as a subprocess (`python -m lmforge serve DIR --port P`) on two scripted models
(tests/parrot.py), so every reply is known in advance:

- "parrot" replies `<img src=x onerror=alert(1)>` to anything, then ends its turn: the page must
  show it as text and run nothing; its server wants an API key;
- "counting" counts sheep forever (until max_tokens), 16 blocks deep to be slow enough to stop.

Without the browser the tests are skipped, or fail when $CI or $LMFORGE_REQUIRE_BROWSER is set
(.ci/run installs it). $LMFORGE_SCREENSHOT_DIR: also save the screenshots there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from parrot import parrot_model_dir, scripted_model_dir
from serveutil import ServerProcess, http_get

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
XSS = "<img src=x onerror=alert(1)>"
API_KEY = "browser-test-key"
COUNTING = ["Counting sheep:"] + [f" {i} sheep," for i in range(1, 59)] + [" 59 sheep. "]  # then again
COUNTING_LAYERS = 16  # ~10 ms a token on the server: a 1900-token reply takes far longer than stopping it
REPLY_TIMEOUT = 30.0


# -- the browser ---------------------------------------------------------------------------
def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    if not missing:
        return None
    return (f"the browser test needs {', '.join(missing)}; "
            "install them with `apt-get install -y chromium chromium-driver` (Debian), as .ci/run does")


@pytest.fixture(scope="module")
def browser_present():
    """Skip without chromium + chromedriver + selenium, or fail where a browser is required."""
    why = _browser_missing()
    if why:
        if any(os.environ.get(v, "").lower() not in ("", "0", "false") for v in ("CI", "LMFORGE_REQUIRE_BROWSER")):
            pytest.fail(f"{why} ($CI or $LMFORGE_REQUIRE_BROWSER is set, so this is required)", pytrace=False)
        pytest.skip(why)


# Every alert/confirm/prompt is recorded instead of shown, before any script of the page runs.
RECORD_DIALOGS = """
window.__dialogs = [];
for (const name of ["alert", "confirm", "prompt"]) {
  window[name] = (message) => { window.__dialogs.push(name + ": " + String(message)); return null; };
}
"""


@pytest.fixture(scope="module")
def driver(browser_present, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--window-size=1100,850", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.unhandled_prompt_behavior = "ignore"  # a real alert stays open for the test to find
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    d = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER, log_output=str(log)))
    try:
        d.set_page_load_timeout(30)
        d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_DIALOGS})
        yield d
    finally:
        d.quit()


# -- the servers ---------------------------------------------------------------------------
class Server(ServerProcess):
    """One thread each: two servers and a browser share the machine's (perhaps two) cores."""

    def __init__(self, model_dir: Path, log: Path, api_key: str | None = None):
        super().__init__(model_dir, log, api_key=api_key, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-browser-models")
    return {
        "parrot": parrot_model_dir(root / "parrot", XSS),
        "counting": scripted_model_dir(root / "counting", COUNTING, loop=True, n_layer=COUNTING_LAYERS, block_size=2048),
    }


@pytest.fixture(scope="module")
def servers(browser_present, model_dirs, tmp_path_factory, request):
    """Both servers, started together (their start-up overlaps), always terminated."""
    logs = tmp_path_factory.mktemp("serve-browser-logs")
    started = {}
    for name, key in (("counting", None), ("parrot", API_KEY)):
        server = Server(model_dirs[name], logs / f"{name}.log", api_key=key)
        request.addfinalizer(server.stop)
        started[name] = server
    for server in started.values():
        server.wait_ready()
    return started


# -- the models, checked before the page relies on them -------------------------------------
def _greedy_reply(model_dir: Path, messages: list[dict], max_new_tokens: int):
    from lmforge.chat import render_chat
    from lmforge.generate.engine import Engine
    from lmforge.generate.params import SamplingParams
    from lmforge.model.io import load_model_dir
    from lmforge.tokenizer import Tokenizer

    model, _ = load_model_dir(model_dir)
    tok = Tokenizer.load(model_dir)
    ids = render_chat(tok, messages, add_generation_prompt=True).ids
    return Engine(model, tok).generate_ids([ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))[0]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": XSS}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": XSS}, {"role": "user", "content": "é 😀 again"}],
])
def test_parrot_model_says_its_reply_and_ends_its_turn(model_dirs, messages):
    done = _greedy_reply(model_dirs["parrot"], messages, max_new_tokens=20)
    assert (done.text, done.finish_reason, len(done.ids)) == (XSS, "stop", 1)


def test_counting_model_never_ends_its_turn(model_dirs):
    done = _greedy_reply(model_dirs["counting"], [{"role": "user", "content": "Tell me a long story."}], 150)
    loop = "".join(COUNTING)
    assert done.finish_reason == "length" and len(done.ids) == 150
    assert done.text == (loop * 3)[: len(done.text)] and len(done.text) > len(loop)


# -- the page --------------------------------------------------------------------------------
def _wait(driver, condition, timeout: float = REPLY_TIMEOUT, message=""):
    """Until condition() is true; else fail with `message` (a string, or a function that says
    what the page shows at that moment)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())
    except TimeoutException:
        said = message() if callable(message) else message
        pytest.fail(f"after {timeout:.0f} s: {said or 'timed out'}", pytrace=False)


def _el(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _messages(driver) -> list[tuple[str, str]]:
    """(role, text) of every message shown, text as the DOM holds it (textContent)."""
    return [tuple(m) for m in driver.execute_script(
        "return [...document.querySelectorAll('#messages .msg')]"
        ".map(e => [e.classList.contains('user') ? 'user' : e.classList.contains('assistant') ? 'assistant' : '?',"
        " e.textContent]);")]


def _last_reply_text(driver) -> str:
    return driver.execute_script(
        "const r = document.querySelectorAll('#messages .msg.assistant'); return r.length ? r[r.length - 1].textContent : null;")


def _set_field(driver, element_id: str, value: str, commit: bool = False) -> None:
    from selenium.webdriver.common.keys import Keys

    field = _el(driver, element_id)
    field.clear()
    field.send_keys(value)
    if commit:  # leave the field: its change event fires
        field.send_keys(Keys.TAB)


def _model_shown(driver) -> str:
    return _el(driver, "model-name").text


def _open(driver, server: Server, api_key: str | None = None) -> None:
    """The page with nothing saved in this browser, the API key typed in when given."""
    driver.get(server.url)
    driver.execute_script("localStorage.clear();")
    driver.get(server.url)
    if api_key:
        _wait(driver, lambda: _model_shown(driver) != "loading\u2026", 10)
        _set_field(driver, "api-key", api_key, commit=True)
    _wait(driver, lambda: _model_shown(driver) == server.model_id(), 10,
          lambda: f"the page does not show the model id; shows {_model_shown(driver)!r}")


def _send(driver, text: str) -> None:
    _set_field(driver, "input", text)
    _el(driver, "send").click()


def _wait_reply_done(driver, count: int) -> None:
    """Until `count` messages are shown and Send is usable again."""
    _wait(driver, lambda: len(_messages(driver)) == count and _el(driver, "send").is_enabled(),
          message=lambda: f"no complete reply: messages {_messages(driver)!r}, error {_el(driver, 'error').text!r}")


def _model_requests(driver) -> list[int]:
    """The HTTP status of each GET v1/models the page made since it loaded."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.endsWith('/v1/models'))"
        ".map(e => e.responseStatus);")


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "screenshot failed"
    if os.environ.get("LMFORGE_SCREENSHOT_DIR"):
        out = Path(os.environ["LMFORGE_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / name)
    return path


def _no_script_errors(driver) -> None:
    """No uncaught JavaScript error in the browser's console (network errors, e.g. a 401, may be)."""
    errors = [e["message"] for e in driver.get_log("browser") if e.get("source") == "javascript"]
    assert not errors, errors


def test_streams_a_reply_and_stop_keeps_the_partial_reply(driver, servers, tmp_path):
    server = servers["counting"]
    _open(driver, server)
    _set_field(driver, "temperature", "0")
    _set_field(driver, "max-tokens", "1900")  # the context is 2048 tokens
    assert not _el(driver, "stop").is_enabled()
    _send(driver, "Tell me a long story.")

    # The reply grows before our eyes: three ever longer observations.
    seen: list[int] = []

    def grew() -> bool:
        text = _last_reply_text(driver) or ""
        if text and (not seen or len(text) > seen[-1]):
            seen.append(len(text))
        return len(seen) >= 3

    _wait(driver, grew, message=lambda: f"the reply did not grow while streaming: lengths {seen}, "
                                        f"error {_el(driver, 'error').text!r}")
    assert _last_reply_text(driver).startswith("Counting sheep: 1 sheep, 2 sheep,")
    assert not _el(driver, "send").is_enabled() and _el(driver, "stop").is_enabled()
    shot = _screenshot(driver, tmp_path, "serve-page-streaming.png")
    assert shot.stat().st_size > 1000

    _el(driver, "stop").click()
    _wait(driver, lambda: _el(driver, "send").is_enabled(), 5, "Send is not usable again after Stop")
    assert not _el(driver, "stop").is_enabled()
    stopped = _last_reply_text(driver)
    time.sleep(0.8)
    assert _last_reply_text(driver) == stopped, "the reply kept growing after Stop"
    whole = "".join((COUNTING * (1900 // len(COUNTING) + 1))[:1900])
    assert whole.startswith(stopped) and seen[-1] <= len(stopped) < len(whole), "a partial reply, kept"
    note = driver.execute_script("const n = document.querySelectorAll('#messages .turn.assistant .note'); "
                                 "return n[n.length - 1].textContent;")
    assert note == "Stopped"
    assert _messages(driver) == [("user", "Tell me a long story."), ("assistant", stopped)]
    driver.refresh()  # the partial reply was saved
    _wait(driver, lambda: _model_shown(driver) == server.model_id(), 10)
    assert _messages(driver) == [("user", "Tell me a long story."), ("assistant", stopped)]

    # Closing the stream cancelled the request on the server: its batch empties, generation stops.
    deadline = time.monotonic() + 10
    while server.metric("lmforge_batch_size") != 0:
        assert time.monotonic() < deadline, "the server still decodes the stopped request"
        time.sleep(0.1)
    generated = server.metric("lmforge_generation_tokens_total")
    time.sleep(0.3)
    assert server.metric("lmforge_generation_tokens_total") == generated < 1900

    # Usable again: the next message streams a new reply.
    _set_field(driver, "max-tokens", "5")
    _send(driver, "Again, shorter.")
    _wait_reply_done(driver, 4)
    assert _messages(driver)[2:] == [("user", "Again, shorter."), ("assistant", "Counting sheep: 1 sheep, 2 sheep, 3 sheep, 4 sheep,")]
    _no_script_errors(driver)


def test_model_output_and_user_text_are_shown_as_text(driver, servers, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException

    server = servers["parrot"]
    _open(driver, server, API_KEY)
    _set_field(driver, "temperature", "0")
    _send(driver, XSS)
    _wait_reply_done(driver, 2)
    assert _messages(driver) == [("user", XSS), ("assistant", XSS)]
    reply = driver.execute_script("const r = document.querySelectorAll('#messages .msg.assistant'); return r[0];")
    assert reply.text == XSS  # what is rendered on screen, too
    assert driver.execute_script("return document.querySelectorAll('#messages img').length;") == 0
    assert driver.execute_script("return document.images.length;") == 0
    titles = driver.execute_script("return [...document.querySelectorAll('#chat-list .chat-item')].map(e => e.textContent);")
    assert titles == [XSS]
    time.sleep(0.3)  # an onerror would have fired by now
    assert driver.execute_script("return window.__dialogs;") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    _screenshot(driver, tmp_path, "serve-page-xss.png")
    _no_script_errors(driver)


def test_history_survives_a_reload_and_new_chat_clears_it(driver, servers):
    server = servers["parrot"]
    _open(driver, server, API_KEY)
    _set_field(driver, "system", "Answer briefly.")
    _set_field(driver, "temperature", "0")
    _set_field(driver, "max-tokens", "30")
    _send(driver, "first question")
    _wait_reply_done(driver, 2)
    _send(driver, "second question")
    _wait_reply_done(driver, 4)
    conversation = [("user", "first question"), ("assistant", XSS), ("user", "second question"), ("assistant", XSS)]
    assert _messages(driver) == conversation

    driver.refresh()
    _wait(driver, lambda: _model_shown(driver) == server.model_id(), 10)  # the saved key works
    assert _messages(driver) == conversation
    assert [_el(driver, i).get_attribute("value") for i in ("system", "temperature", "max-tokens", "api-key")] == \
        ["Answer briefly.", "0", "30", API_KEY]

    _el(driver, "new-chat").click()
    assert _messages(driver) == []
    assert _el(driver, "empty").is_displayed()
    driver.refresh()
    _wait(driver, lambda: _model_shown(driver) == server.model_id(), 10)
    assert _messages(driver) == []
    # The old chat is listed, and opens again.
    items = driver.execute_script("return [...document.querySelectorAll('#chat-list .chat-item')];")
    assert [i.text for i in items] == ["first question"]
    items[0].click()
    assert _messages(driver) == conversation
    _no_script_errors(driver)


def test_without_the_api_key_the_page_asks_for_it(driver, servers):
    server = servers["parrot"]
    # The page is open, the API is not.
    for path in ("", "static/chat.js", "static/chat.css"):
        assert http_get(server.url + path)[0] == 200, path
    assert http_get(server.url + "v1/models")[0] == 401

    driver.get(server.url)
    driver.execute_script("localStorage.clear();")
    driver.refresh()
    error = _el(driver, "error")
    _wait(driver, lambda: error.is_displayed(), 10, "no error shown without the API key")
    assert "401" in error.text and "API key" in error.text
    assert _model_shown(driver) == "unavailable"
    assert _model_requests(driver) == [401]
    _send(driver, "hello")  # asks for the model again, in vain
    _wait(driver, lambda: _model_requests(driver) == [401, 401], 10)
    assert _messages(driver) == []
    assert _el(driver, "input").get_attribute("value") == "hello"  # kept, to send again
    assert error.is_displayed() and "API key" in error.text

    _set_field(driver, "api-key", "wrong-key", commit=True)
    _wait(driver, lambda: _model_requests(driver) == [401, 401, 401], 10)
    assert error.is_displayed() and "401" in error.text and _model_shown(driver) == "unavailable"
    _set_field(driver, "api-key", API_KEY, commit=True)
    _wait(driver, lambda: _model_shown(driver) == server.model_id() and not error.is_displayed(), 10)
    _el(driver, "send").click()
    _wait_reply_done(driver, 2)
    assert _messages(driver) == [("user", "hello"), ("assistant", XSS)]
    _no_script_errors(driver)


def test_narrow_window(driver, servers, tmp_path):
    server = servers["parrot"]
    _open(driver, server, API_KEY)
    driver.set_window_size(400, 800)
    try:
        _send(driver, "a phone-sized window " * 8)
        _wait_reply_done(driver, 2)
        overflow = driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
        assert overflow <= 0, "the page scrolls sideways"
        for element_id in ("input", "send", "stop", "messages"):
            assert _el(driver, element_id).is_displayed(), element_id
        assert not _el(driver, "system").is_displayed()  # the settings slide in from the menu
        _el(driver, "toggle-sidebar").click()
        _wait(driver, lambda: _el(driver, "system").is_displayed(), 5)
        _screenshot(driver, tmp_path, "serve-page-narrow.png")
    finally:
        driver.set_window_size(1100, 850)
    _no_script_errors(driver)


SSE_STREAM = (
    ": keep-alive\r\n\r\n"
    'data: {"a": "é 😀"}\r\n\r\n'
    "data: line1\ndata: line2\n\n"
    "event: error\ndata: x\r\r"
    "data:nospace\n\n"
    "id: 7\nretry: 10\n\n"
    "data: [DONE]"  # the last event needs no blank line after it
)
SSE_EVENTS = [['{"a": "é 😀"}', ""], ["line1\nline2", ""], ["x", "error"], ["nospace", ""], ["[DONE]", ""]]


def test_event_stream_parser_handles_any_chunking(driver, servers):
    """The page's SSE parser gives the same events however the bytes are split into chunks
    (inside a line, between \\r and \\n, inside a UTF-8 character)."""
    _open(driver, servers["counting"])
    got = driver.execute_script("""
        const bytes = new TextEncoder().encode(arguments[0]);
        const run = (cuts) => {
          const events = [];
          const parser = new window.lmforgeChat.SSEParser((data, event) => events.push([data, event]));
          const decoder = new TextDecoder();
          let start = 0;
          for (const cut of [...cuts, bytes.length]) {
            parser.push(decoder.decode(bytes.slice(start, cut), {stream: true}));
            start = cut;
          }
          parser.push(decoder.decode());
          parser.end();
          return JSON.stringify(events);
        };
        const results = {whole: run([])};
        const bad = [];
        for (let i = 0; i <= bytes.length; i++) if (run([i]) !== results.whole) bad.push(i);
        results.bad = bad;
        results.bytewise = run([...Array(bytes.length).keys()]);
        return results;
    """, SSE_STREAM)
    assert json.loads(got["whole"]) == SSE_EVENTS
    assert got["bad"] == []
    assert got["bytewise"] == got["whole"]
