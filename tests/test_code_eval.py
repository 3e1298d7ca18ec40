"""`lmforge eval code`: the pass@k estimator, the harness on hand-written problems with known
right and wrong answers, and the sandbox against hostile samples (each must leave the host
standing, be reported with its cause, and end in seconds)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from math import comb

import pytest

from conftest import one_line_error, write_jsonl

from lmforge.errors import LmforgeError
from lmforge.eval.code import (CHAT_STOP, STOP, Problem, chat_message, completion_from_reply, generate_completions,
                               load_problems, pass_at_k, program, CodeEvalConfig)
from lmforge.eval.sandbox import Sandbox, SandboxConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ADD = {"task_id": "t/add", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"}
REV = {"task_id": "t/rev", "prompt": "def rev(s):\n", "entry_point": "rev",
       "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n"}


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxConfig(timeout=3))


def run(sandbox, source: str):
    started = time.monotonic()
    r = sandbox.run(source)
    assert time.monotonic() - started < 15, "each hostile sample must end in seconds"
    return r


# -- pass@k ------------------------------------------------------------------------------------------
def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of n samples (c correct) holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 12])
def test_pass_at_k_equals_enumeration_over_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(200, 10) is ~2e16: the product form needs no big binomials and stays in [0, 1].
    n, c, k = 200, 3, 10
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)
    assert pass_at_k(200, 0, 10) == 0.0 and pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


# -- the harness on known answers --------------------------------------------------------------------
@pytest.fixture
def problem_file(tmp_path):
    return write_jsonl(tmp_path / "problems.jsonl", [ADD, REV])


def completions_file(tmp_path, rows):
    return write_jsonl(tmp_path / "completions.jsonl", [{"task_id": t, "completion": c} for t, c in rows])


KNOWN = [  # (task, completion, expected failure or None for a pass)
    ("t/add", "    return a + b\n", None),
    ("t/add", "    return a - b\n", "assertion"),
    ("t/add", "    return a +\n", "syntax_error"),
    ("t/add", "    return a + undefined_name\n", "exception:NameError"),
    ("t/add", "    while True:\n        pass\n", "timeout"),
    ("t/add", "    import sys\n    sys.exit(0)\n", "exception:SystemExit"),  # exits before check() finishes: no pass
    ("t/rev", "    return s[::-1]\n", None),
    ("t/rev", "    return s\n", "assertion"),
    ("t/rev", "    return s.reverse()\n", "exception:AttributeError"),
]


def test_known_completions_pass_and_fail_for_the_right_reasons(cli, tmp_path, problem_file):
    rows = [(t, c) for t, c, _ in KNOWN]
    comp = completions_file(tmp_path, rows)
    r = cli("eval", "code", "--problems", problem_file, "--completions", comp, "--timeout", "2",
            "-o", tmp_path / "out.json", "--no-progress")
    assert r.code == 0, r.err
    result = json.loads((tmp_path / "out.json").read_text())
    samples = {p["task_id"]: p["samples"] for p in result["details"]["problems"]}
    got = [s["failure"] for s in samples["t/add"]] + [s["failure"] for s in samples["t/rev"]]
    assert got == [f for _, _, f in KNOWN]
    add_n, rev_n = 6, 3
    add_c, rev_c = 1, 1
    assert result["problems"] == 2 and result["samples"] == add_n + rev_n and result["passed"] == add_c + rev_c
    assert result["pass_at_k"] == {"pass@1": pytest.approx((add_c / add_n + rev_c / rev_n) / 2)}  # no pass@10: n < 10
    assert result["failures"]["assertion"] == 2 and result["failures"]["timeout"] == 1
    assert "AttributeError" in samples["t/rev"][2]["stderr_tail"]
    md = (tmp_path / "out.md").read_text()
    assert "pass@1" in md and "exception:NameError" in md and "t/rev" in md
    assert "pass@1 0.2500" in r.out  # the summary line


def test_pass_at_10_appears_when_every_problem_has_ten_samples(tmp_path, problem_file):
    from lmforge.eval.code import evaluate_code

    rows = [("t/add", "    return a + b\n")] * 3 + [("t/add", "    return 0\n")] * 7
    rows += [("t/rev", "    return s[::-1]\n")] + [("t/rev", "    return s\n")] * 9
    r = evaluate_code(None, problem_file, completions=completions_file(tmp_path, rows),
                      sandbox_config=SandboxConfig(timeout=3))
    assert r["pass_at_k"]["pass@1"] == pytest.approx((0.3 + 0.1) / 2)
    assert r["pass_at_k"]["pass@10"] == pytest.approx(1.0)


def test_humaneval_problems_come_from_the_packaged_data_file():
    problems = load_problems("humaneval")
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert all(p.test.strip() and p.entry_point.isidentifier() for p in problems)
    assert len(load_problems("humaneval", limit=3)) == 3


def test_humaneval_canonical_solutions_pass(sandbox):
    # The canonical solutions of the first problems pass and a wrong one fails: the program is
    # built as HumanEval's harness builds it.
    import gzip

    from lmforge.eval.code import humaneval_path

    rows = [json.loads(line) for line in gzip.open(humaneval_path())][:8]
    problems = load_problems("humaneval", limit=8)
    results = sandbox.run_many([program(p, r["canonical_solution"]) for p, r in zip(problems, rows)])
    assert [r.failure for r in results] == [None] * 8
    assert sandbox.run(program(problems[0], "    return False\n")).failure == "assertion"


# -- hostile samples -----------------------------------------------------------------------------------
def test_fork_bomb_is_capped_and_killed(sandbox):
    counted = run(sandbox, "import os, time\nn = 0\nfor _ in range(10000):\n    try:\n        pid = os.fork()\n"
                           "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n"
                           "        os._exit(0)\n    n += 1\nprint('forked', n)\nassert n < 32, n\n")
    assert counted.passed, (counted.failure, counted.stderr_tail)  # RLIMIT_NPROC stopped it below 32 processes
    bomb = run(sandbox, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert bomb.failure == "timeout"


def test_ten_gigabytes_is_a_memory_failure(sandbox):
    r = run(sandbox, "x = bytearray(10 * 2**30)\n")
    assert r.failure == "memory" and "MemoryError" in r.stderr_tail


def test_infinite_loop_and_sleep_time_out(sandbox):
    for source in ("while True:\n    pass\n", "import time\ntime.sleep(3600)\n"):
        r = run(sandbox, source)
        assert r.failure == "timeout" and r.seconds < 6


def test_writing_outside_its_directory_fails_or_stays_invisible(sandbox, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("as an ordinary user the sample runs as that user, who may write the user's files "
                    "(the sandbox hides them only when lmforge runs as root: uid 65534)")
    target = tmp_path / "escaped.txt"
    r = run(sandbox, f"open({str(target)!r}, 'w').write('pwned')\n")
    assert r.failure == "exception:PermissionError"
    assert not target.exists()
    home = run(sandbox, "import os\nopen(os.path.expanduser('~/inside.txt'), 'w').write('ok')\n"
                        "assert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']\n")
    assert home.passed, home.stderr_tail  # its own directory is writable (and removed afterwards)


def test_no_network_even_to_the_hosts_loopback(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    got, finished = [], threading.Event()

    def accept():  # listens until the sample has ended
        while not finished.is_set():
            try:
                got.append(server.accept())
            except OSError:
                pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        r = run(sandbox, f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                         "s.sendall(b'leak')\n")
    finally:
        finished.set()
        t.join()
        server.close()
    assert not got, "the host's listener received a connection"
    assert r.failure.startswith("exception:") and "unreachable" in r.stderr_tail.lower()


def test_killing_the_parent_kills_only_the_sample(sandbox):
    r = run(sandbox, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(1)\n")
    assert r.failure == "killed:SIGKILL"
    assert sandbox.run("assert True\n").passed  # the host (this process) goes on


def test_printing_a_gigabyte_is_cut_at_the_cap(sandbox):
    r = run(sandbox, "import sys\nfor _ in range(10**6):\n    sys.stdout.write('x' * 1000)\n")
    assert r.failure == "output_limit"


def test_the_environment_is_scrubbed_and_stdin_closed(sandbox, monkeypatch):
    monkeypatch.setenv("LMFORGE_SECRET_TOKEN", "hunter2")
    r = run(sandbox, "import os, sys\nassert 'LMFORGE_SECRET_TOKEN' not in os.environ, os.environ\n"
                     "assert sys.stdin.read() == ''\nassert sys.flags.isolated and sys.flags.no_site\n")
    assert r.passed, r.stderr_tail


def test_samples_run_in_parallel():
    sb = Sandbox(SandboxConfig(timeout=5, workers=4))
    started = time.monotonic()
    results = sb.run_many(["import time\ntime.sleep(1)\n"] * 4)
    assert all(r.passed for r in results)
    assert time.monotonic() - started < 3.5  # four 1-second samples at once, not 4 s in a row


def test_missing_namespaces_refuse_to_start_unless_unsafe(monkeypatch, capsys):
    from lmforge.errors import LmforgeError
    from lmforge.eval import sandbox as S

    monkeypatch.setattr(S.Sandbox, "_namespaces_problem", lambda self: "no `unshare` command (Debian: util-linux)")
    with pytest.raises(LmforgeError, match="needs user, network and pid namespaces.*--unsafe-no-netns"):
        S.Sandbox(SandboxConfig())
    sb = S.Sandbox(SandboxConfig(unsafe_no_netns=True, timeout=3))
    assert "WARNING" in capsys.readouterr().err and not sb.isolated and "NO namespaces" in sb.isolation
    assert sb.run("assert 1 + 1 == 2\n").passed and sb.run("assert False\n").failure == "assertion"


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, fragments", [
    (json.dumps({k: v for k, v in ADD.items() if k != "test"}) + "\n", [":1:", "missing field 'test'"]),
    (json.dumps(ADD) + "\n" + '{"task_id": "x", "prompt": 3}\n', [":2:", "'prompt' must be a non-empty string"]),
    (json.dumps(ADD) + "\n{not json\n", [":2:", "invalid JSON"]),
    (json.dumps(ADD) + "\n" + json.dumps(ADD) + "\n", [":2:", "again"]),
])
def test_bad_problem_files_are_one_line_errors(cli, tmp_path, content, fragments):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    comp = completions_file(tmp_path, [("t/add", "    return a + b\n")])
    one_line_error(cli("eval", "code", "--problems", bad, "--completions", comp), str(bad), *fragments)


@pytest.mark.parametrize("line, fragments", [
    ('{"task_id": "t/add"}', ["missing field 'completion'"]),
    ('{"task_id": "t/nope", "completion": "x"}', ["'t/nope' is not among the problems"]),
    ('{"task_id": "t/add", "completion": 5}', ["'completion' must be a string"]),
    ('["t/add"]', ["expected a JSON object"]),
])
def test_bad_completion_files_are_one_line_errors(cli, tmp_path, problem_file, line, fragments):
    comp = tmp_path / "comp.jsonl"
    comp.write_text('{"task_id": "t/add", "completion": "    return a + b\\n"}\n' + line + "\n")
    one_line_error(cli("eval", "code", "--problems", problem_file, "--completions", comp), f"{comp}:2:", *fragments)


def test_model_or_completions_and_sampling_settings_are_checked(cli, tmp_path, problem_file):
    one_line_error(cli("eval", "code", "--problems", problem_file), "give a MODEL")
    one_line_error(cli("eval", "code", "--problems", problem_file, "--samples", "5"), "--temperature")
    one_line_error(cli("eval", "code", "--problems", problem_file, "--timeout", "0"), "--timeout")


# -- a model through the Engine --------------------------------------------------------------------
def test_tiny_model_generates_and_is_scored(cli, tmp_path, tiny_model_dir, problem_file):
    out = tmp_path / "tiny.json"
    r = cli("eval", "code", tiny_model_dir, "--problems", problem_file, "--samples", "3", "--temperature", "0.8",
            "--max-new-tokens", "16", "--timeout", "3", "-o", out, "--no-progress")
    assert r.code == 0, r.err
    result = json.loads(out.read_text())
    assert result["kind"] == "code" and result["model"]["params"] > 0
    assert result["samples"] == 6 and result["samples_per_problem"] == [3, 3]
    assert set(result["pass_at_k"]) == {"pass@1"} and 0.0 <= result["pass_at_k"]["pass@1"] <= 1.0
    assert sum(result["failures"].values()) == result["samples"] - result["passed"]
    assert result["settings"]["stop"] == STOP and result["settings"]["temperature"] == 0.8
    # A random model writes junk: every failure is still classified, never left unexplained.
    for p in result["details"]["problems"]:
        for s in p["samples"]:
            assert s["status"] in ("passed", "failed") and (s["failure"] is None) == (s["status"] == "passed")
    compare = cli("eval", "compare", out, "-o", tmp_path / "cmp.json")
    assert compare.code == 0, compare.err


def test_generation_is_cut_at_the_stop_sequences(tiny_model_dir):
    from lmforge.eval.perplexity import load_engine

    engine, _ = load_engine(str(tiny_model_dir))
    problems = [Problem(**ADD), Problem(**REV)]
    config = CodeEvalConfig(samples=2, temperature=1.0, max_new_tokens=24, batch_size=3)
    got, replies, cut = generate_completions(engine, problems, config)
    assert list(got) == ["t/add", "t/rev"] and all(len(v) == 2 for v in got.values()) and cut == 0
    assert replies is None  # raw: the completion is the generated text itself
    assert all(stop not in c for cs in got.values() for c in cs for stop in STOP)
    again, _, _ = generate_completions(engine, problems, config)
    assert again == got  # seeded


# -- --prompt-format chat (instruct models) ---------------------------------------------------------
TYPED = {"task_id": "t/total", "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n"
         "    \"\"\"Sum of xs.\"\"\"\n", "entry_point": "total",
         "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"}
WHOLE = "def add(a, b):\n    return a + b\n"

CHAT_REPLIES = [  # (reply, the completion it becomes): each passes ADD when run
    (f"Here it is:\n\n```python\n{WHOLE}```\n\nIt adds a and b.", "\n" + WHOLE),  # fenced, with a language
    (f"```\n{WHOLE}```", "\n" + WHOLE),  # a plain fence
    ("```python\ndef add(a, b):\n    return a + b", "\n" + WHOLE),  # no closing fence: the stop string cut it
    (f"```py\n{WHOLE}```\nor\n```python\ndef add(a, b):\n    return 0\n```\n", "\n" + WHOLE),  # the first block only
    ("    return a + b\n", "    return a + b\n"),  # no fence: the reply as it is
    ("```python\n    return a + b\n```\n", "    return a + b\n"),  # a body only: continues the prompt's function
    ("```python\nimport math\n\ndef add(a, b):\n    return math.fsum([a, b])\n```",  # imports before the function
     "\nimport math\n\ndef add(a, b):\n    return math.fsum([a, b])\n"),
]


@pytest.mark.parametrize("reply, completion", CHAT_REPLIES)
def test_completion_from_reply_takes_the_first_fenced_block(sandbox, reply, completion):
    add = Problem(**ADD)
    got = completion_from_reply(reply, add)
    assert got == completion
    r = sandbox.run(program(add, got))
    assert r.passed, (r.failure, r.stderr_tail)


def test_a_replied_function_replaces_the_prompts_and_keeps_its_imports(sandbox):
    # Replies drop `from typing import List`: after the prompt, the prompt's import is in effect.
    typed = Problem(**TYPED)
    reply = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    completion = completion_from_reply(reply, typed)
    assert completion == "\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n"
    r = sandbox.run(program(typed, completion))
    assert r.passed, (r.failure, r.stderr_tail)
    alone = sandbox.run(completion + "\n" + typed.test + "\ncheck(total)\n")  # what the prompt's import saves it from
    assert alone.failure == "exception:NameError" and "List" in alone.stderr_tail
    wrong = completion_from_reply("```python\ndef total(xs: List[int]) -> int:\n    return len(xs)\n```", typed)
    assert sandbox.run(program(typed, wrong)).failure == "assertion"  # the reply's definition is the one checked
    # A prompt with no body yet (no docstring) still takes the whole function.
    rev = Problem(**REV)
    done = sandbox.run(program(rev, completion_from_reply("```python\ndef rev(s):\n    return s[::-1]\n```", rev)))
    assert done.passed, (done.failure, done.stderr_tail)


def test_prompt_format_is_checked(cli, tmp_path, problem_file):
    with pytest.raises(LmforgeError, match="--prompt-format must be raw or chat, got 'json'"):
        CodeEvalConfig(prompt_format="json")
    one_line_error(cli("eval", "code", "x", "--problems", problem_file, "--prompt-format", "Chat"), "--prompt-format")
    assert CodeEvalConfig().stop == STOP and CodeEvalConfig().prompt_format == "raw"
    assert CodeEvalConfig(prompt_format="chat").stop == CHAT_STOP == ["\n```\n"]
    assert CodeEvalConfig(prompt_format="chat", stop=["\nEND"]).stop == ["\nEND"]  # one given is kept
    comp = completions_file(tmp_path, [("t/add", "    return a + b\n")])
    one_line_error(cli("eval", "code", "--problems", problem_file, "--completions", comp, "--prompt-format", "chat"),
                   "--prompt-format chat", "--completions")


class CannedEngine:
    """An Engine that records the prompts and parameters it is given and answers with canned
    texts; encoding, lengths and the tokenizer are a real model's."""

    def __init__(self, engine, texts: dict[str, str]):
        self.engine, self.texts = engine, texts  # {a fragment of the prompt: the text generated for it}
        self.tokenizer, self.device, self.decode_backend_used = engine.tokenizer, engine.device, None
        self.prompts, self.params = [], []

    def encode(self, prompt):
        return self.engine.encode(prompt)

    def check_length(self, ids, params, truncate=None):
        return self.engine.check_length(ids, params, truncate)

    def generate_ids(self, prompts, params):
        from lmforge.generate.engine import Completion

        out = []
        for ids in prompts:
            self.prompts.append(ids)
            self.params.append(params)
            text = self.tokenizer.decode(ids)
            reply = next(v for k, v in self.texts.items() if k in text)
            out += [Completion(list(ids), [], reply, "stop")] * params.num_return_sequences
        return out


def canned(tiny_model_dir, monkeypatch, texts):
    from lmforge.eval import perplexity

    engine, loaded = perplexity.load_engine(str(tiny_model_dir))
    fake = CannedEngine(engine, texts)
    monkeypatch.setattr(perplexity, "load_engine", lambda spec, device="cpu": (fake, loaded))
    return fake


def test_chat_prompts_go_through_the_chat_template_and_replies_are_converted(tiny_model_dir, tmp_path, problem_file,
                                                                            monkeypatch):
    from lmforge.chat import render_chat
    from lmforge.eval.code import evaluate_code

    replies = {"def add(": f"Sure!\n```python\n{WHOLE}", "def rev(": "```python\ndef rev(s):\n    return s\n```"}
    fake = canned(tiny_model_dir, monkeypatch, replies)
    config = CodeEvalConfig(prompt_format="chat", samples=2, temperature=0.8, max_new_tokens=12)  # the prompts fit the context of 128 whole
    r = evaluate_code(str(tiny_model_dir), problem_file, config, SandboxConfig(timeout=3))
    # One user message through the model's own template, with the generation prompt; the problem's
    # prompt inside it, fenced.
    texts = sorted(fake.tokenizer.decode(ids) for ids in fake.prompts)
    for text, p in zip(texts, (Problem(**ADD), Problem(**REV))):
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert "```python\n" + p.prompt + "```" in text and chat_message(p) in text
        want = render_chat(fake.tokenizer, [{"role": "user", "content": chat_message(p)}], add_generation_prompt=True)
        assert want.ids in fake.prompts
    # Cut at a closing fence only, within max_new_tokens, ending at the model's eos as ever.
    assert all(p.stop == CHAT_STOP and p.max_new_tokens == 12 and not p.ignore_eos for p in fake.params)
    assert r["settings"]["stop"] == CHAT_STOP
    assert r["settings"]["prompt"].startswith("chat: ") and "Complete the following Python function" in r["settings"]["prompt"]
    assert "first fenced block" in r["settings"]["prompt"]
    samples = {p["task_id"]: p["samples"] for p in r["details"]["problems"]}
    assert [s["reply"] for s in samples["t/add"]] == [replies["def add("]] * 2  # what the model wrote
    assert [s["completion"] for s in samples["t/add"]] == ["\n" + WHOLE] * 2  # what ran
    assert [s["status"] for s in samples["t/add"]] == ["passed"] * 2
    assert [s["failure"] for s in samples["t/rev"]] == ["assertion"] * 2
    assert r["pass_at_k"] == {"pass@1": 0.5}


def test_raw_prompts_are_unchanged_by_default(tiny_model_dir, tmp_path, problem_file, monkeypatch):
    from lmforge.eval.code import evaluate_code

    texts = {"def add(": "    return a + b\n```\n", "def rev(": "    return s[::-1]"}
    fake = canned(tiny_model_dir, monkeypatch, texts)
    r = evaluate_code(str(tiny_model_dir), problem_file, CodeEvalConfig(max_new_tokens=12), SandboxConfig(timeout=3))
    assert sorted(fake.prompts) == sorted([fake.encode(ADD["prompt"]), fake.encode(REV["prompt"])])  # the bare prompt
    assert all(p.stop == STOP for p in fake.params)
    assert r["settings"]["prompt"] == "raw (no chat template)" and r["settings"]["stop"] == STOP
    for p in r["details"]["problems"]:
        assert [list(s)[:4] for s in p["samples"]] == [["completion", "status", "failure", "seconds"]]  # no reply key
    got = {p["task_id"]: p["samples"][0]["completion"] for p in r["details"]["problems"]}
    assert got == {"t/add": texts["def add("], "t/rev": texts["def rev("]}  # the text as generated, unconverted
    assert r["pass_at_k"] == {"pass@1": 0.5}  # the fence the raw text carries is a syntax error, not removed


def test_tiny_chat_model_generates_replies_and_scores_them(cli, tmp_path, tiny_model_dir, problem_file):
    out = tmp_path / "chat.json"
    r = cli("eval", "code", tiny_model_dir, "--problems", problem_file, "--prompt-format", "chat", "--samples", "2",
            "--temperature", "0.8", "--max-new-tokens", "16", "--timeout", "3", "-o", out, "--no-progress")
    assert r.code == 0, r.err
    result = json.loads(out.read_text())
    assert result["samples"] == 4 and result["settings"]["stop"] == CHAT_STOP
    assert not any("cut from the left" in n for n in result["notes"])  # the whole chat prompt was seen
    problems = {p["task_id"]: Problem(**p) for p in (ADD, REV)}
    for p in result["details"]["problems"]:
        for s in p["samples"]:
            assert "\n```\n" not in s["reply"]
            assert s["completion"] == completion_from_reply(s["reply"], problems[p["task_id"]])
            assert s["status"] in ("passed", "failed")


def test_chat_needs_a_chat_template(cli, tmp_path, tiny_model_dir, problem_file):
    import shutil

    from lmforge.manifest import write_manifest

    model = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    write_manifest(model)
    one_line_error(cli("eval", "code", model, "--problems", problem_file, "--prompt-format", "chat", "-o",
                       tmp_path / "x.json", "--no-progress"), "--prompt-format chat: this model has no chat template")
    assert not (tmp_path / "x.json").exists()
