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

from lmforge.eval.code import (STOP, Problem, generate_completions, load_problems, pass_at_k, program,
                               CodeEvalConfig)
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
    got, cut = generate_completions(engine, problems, config)
    assert list(got) == ["t/add", "t/rev"] and all(len(v) == 2 for v in got.values()) and cut == 0
    assert all(stop not in c for cs in got.values() for c in cs for stop in STOP)
    again, _ = generate_completions(engine, problems, config)
    assert again == got  # seeded
