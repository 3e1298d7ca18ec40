"""Run untrusted Python programs (model-written code) one per process, each fenced in.

Every program runs as

    unshare --user --map-root-user --net --pid --fork --kill-child -- PYTHON -I -S -B -c BOOT

in a new session (its own process group), with

- **namespaces**: a new network namespace (no interface but a loopback that is down: no
  network at all, not even the host's 127.0.0.1), a new pid namespace (it sees and signals only
  its own processes; when its first process ends the kernel kills the rest) and a user
  namespace (its "root" has no power outside);
- **an unprivileged uid**: when lmforge runs as root the program runs as uid/gid 65534
  (`nobody`, no supplementary groups), because the kernel never enforces RLIMIT_NPROC for root;
  the host's files are then closed to it by their permissions (an ordinary user's program runs
  as that user, who owns the user's files: the fence there is the namespaces and limits);
- **rlimits**, set by BOOT before the program's first line: CPU seconds (SIGXCPU), address
  space (MemoryError), file size, open files, processes + threads (a fork bomb gets EAGAIN;
  counted per sandbox, since each has its own user namespace), no core files;
- a wall-clock **timeout** after which the whole process group gets SIGKILL;
- a fresh **temporary directory** as cwd, HOME and TMPDIR, removed afterwards;
- a **scrubbed environment** (PATH, HOME, TMPDIR, LANG, LC_ALL, PYTHONHASHSEED,
  PYTHONDONTWRITEBYTECODE, PYTHONIOENCODING) and an isolated interpreter (`-I -S -B`: no user
  site, no site-packages, no PYTHON* variables, no bytecode written);
- **stdin closed** (/dev/null) and stdout + stderr read through pipes up to a cap (more is the
  failure `output_limit` and the group is killed: a program printing 1 GB costs the host 1 MiB).

BOOT (below) compiles and runs `program.py` and writes one status line, tagged with a random
token, as its last act: "passed", "syntax_error", "assertion", "memory" or
"exception:<TypeName>". Without that line the cause comes from how the process ended:
"timeout" (wall clock or SIGXCPU), "output_limit", "killed:<SIGNAL>" or "exit:<code>" (it
left through os._exit before finishing). A program passes only when BOOT saw it run to its
end: `sys.exit(0)` or `os._exit(0)` halfway is a failure, not a pass.

Where the namespaces are unavailable (no util-linux `unshare`, user namespaces disabled) the
sandbox refuses to start, unless `unsafe_no_netns` is set: then programs run with the limits
but without the namespaces — with the host's network — after a loud warning.
"""

from __future__ import annotations

import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from lmforge.errors import LmforgeError

NOBODY = 65534  # the uid/gid programs run as when lmforge runs as root
TAIL_CHARS = 800  # of stderr, kept per sample for the report
_KEEP_STDERR = 64 << 10  # bytes of stderr kept while reading (its end holds the status line)
UNSHARE_FLAGS = ("--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child")
ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class SandboxConfig:
    timeout: float = 5.0  # wall-clock seconds per sample; then its whole process group is killed
    memory_mb: int = 1024  # address space per process (RLIMIT_AS), MiB
    file_size_mb: int = 16  # largest file a sample may write (RLIMIT_FSIZE), MiB
    max_open_files: int = 64  # open files per process (RLIMIT_NOFILE)
    max_processes: int = 32  # processes + threads in one sample (RLIMIT_NPROC): stops a fork bomb
    max_output_kb: int = 1024  # stdout + stderr read per sample, KiB; more fails it as output_limit
    workers: int = 0  # samples run at once (0 = one per core)
    python: str = ""  # interpreter for the samples (default: this one; as root, one that uid 65534 may run)
    unsafe_no_netns: bool = False  # where namespaces are unavailable, run anyway WITHOUT network/pid isolation (a loud warning)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise LmforgeError(f"--timeout must be positive, got {self.timeout}")
        for name, floor in (("memory_mb", 64), ("file_size_mb", 1), ("max_open_files", 16), ("max_processes", 1),
                            ("max_output_kb", 1), ("workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < floor:
                raise LmforgeError(f"--{name.replace('_', '-')} must be an integer >= {floor}, got {value!r}")

    @property
    def cpu_seconds(self) -> int:
        return int(self.timeout) + 1


@dataclass
class ExecResult:
    status: str  # "passed" or "failed"
    failure: str | None  # None when passed; else syntax_error, assertion, exception:<Type>, timeout, memory, output_limit, killed:<SIG>, exit:<code>, sandbox_error
    seconds: float  # wall clock
    stderr_tail: str  # the end of what it wrote to stderr (the traceback)
    returncode: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs in the sandboxed interpreter: limits first, then the program; the last line on stderr
# is the status, tagged with a token (formatted in) that the program's own output lacks.
BOOT = r'''
import os, resource, sys
for _r, _v in zip((resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE,
                   resource.RLIMIT_NPROC), map(int, sys.argv[1:6])):
    resource.setrlimit(_r, (_v, _v + 1 if _r == resource.RLIMIT_CPU else _v))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = ["program.py"]
def _lmforge_run():
    import traceback
    main = os.getpid()
    def done(status, code):
        if os.getpid() == main:  # a forked child never speaks for the program
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
            try:
                os.write(2, ("\n__TOKEN__ " + status + "\n").encode())
            except BaseException:
                pass
        os._exit(code)
    def report():
        try:
            traceback.print_exc()
        except BaseException:
            pass
    try:
        with open("program.py", "rb") as f:
            code = compile(f.read(), "program.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        report()
        done("syntax_error", 1)
    try:
        exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
    except AssertionError:
        report()
        done("assertion", 1)
    except MemoryError:
        report()
        done("memory", 1)
    except BaseException as e:
        report()
        done("exception:" + type(e).__name__, 1)
    done("passed", 0)
_lmforge_run()
'''


def _run_as() -> dict:
    """Popen arguments that drop root to uid/gid 65534 (done in C by subprocess: safe with threads)."""
    if os.geteuid() != 0:
        return {}
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def _env(home: str) -> dict[str, str]:
    return {"PATH": ENV_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove(path: str) -> None:
    def retry(func, p, _exc):  # a sample may leave a folder without permissions
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


class Sandbox:
    """Runs programs under SandboxConfig's limits; construction checks the isolation works here
    (and raises LmforgeError naming what is missing)."""

    def __init__(self, config: SandboxConfig | None = None, *, warn: Callable[[str], None] | None = None):
        self.config = config or SandboxConfig()
        self.notes: list[str] = []
        self.unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
        self.isolated = True
        self.python = ""
        problem = self._namespaces_problem()
        if problem:
            if not self.config.unsafe_no_netns:
                raise LmforgeError(
                    f"the code sandbox needs user, network and pid namespaces ({problem}); install util-linux's "
                    "`unshare` and allow unprivileged user namespaces (sysctl user.max_user_namespaces > 0, "
                    "kernel.unprivileged_userns_clone=1), or pass --unsafe-no-netns to run untrusted code WITH "
                    "network access and without pid isolation")
            self.isolated = False
            message = (f"WARNING: no namespaces ({problem}): --unsafe-no-netns runs the samples with the host's "
                       "network and able to see and signal the host's processes; only rlimits, the timeout"
                       + (" and uid 65534" if os.geteuid() == 0 else "") + " fence them in")
            self.notes.append(message)
            (warn or (lambda m: print(f"lmforge: {m}", file=sys.stderr, flush=True)))(message)
        self.python, self.python_version = self._find_python()

    @property
    def isolation(self) -> str:
        """How the samples are fenced in, in words (for the result's settings)."""
        parts = ["user+network+pid namespaces" if self.isolated else "NO namespaces (--unsafe-no-netns)", "rlimits"]
        if os.geteuid() == 0:
            parts.append("uid 65534")
        return ", ".join(parts)

    # -- set-up checks ---------------------------------------------------------------------------
    def _namespaces_problem(self) -> str | None:
        if self.unshare is None:
            return "no `unshare` command (Debian: util-linux)"
        try:
            p = subprocess.run([self.unshare, *UNSHARE_FLAGS, "--", "true"], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=30, env=_env("/"), cwd="/", **_run_as())
        except (OSError, subprocess.SubprocessError) as e:
            return f"`unshare` failed: {e}"
        if p.returncode != 0:
            return f"`unshare {' '.join(UNSHARE_FLAGS)}` failed: " + (p.stderr.decode(errors="replace").strip()
                                                                      .splitlines() or ["exit %d" % p.returncode])[-1]
        return None

    def _find_python(self) -> tuple[str, str]:
        if self.config.python:
            candidates = [self.config.python]
        else:
            # As root the samples run as uid 65534, which may not reach this interpreter (pyenv under /root).
            candidates = list(dict.fromkeys([sys.executable, os.path.realpath(sys.executable),
                                             "/usr/bin/python3", "/usr/local/bin/python3"]))
        tried = []
        for python in candidates:
            if not python or not os.path.exists(python):
                continue
            r, stdout = self._execute(python, "import sys\nprint('%d.%d.%d' % sys.version_info[:3])\n")
            if r.passed:
                return python, stdout.strip()
            tried.append(f"{python}: {r.failure} {r.stderr_tail.strip().splitlines()[-1:] or ''}")
        who = " as uid 65534" if os.geteuid() == 0 else ""
        raise LmforgeError(f"no Python interpreter runs in the code sandbox{who}: "
                           + ("; ".join(tried) or "none found") + " (give one with --python)")

    # -- running ---------------------------------------------------------------------------------
    def run(self, program: str) -> ExecResult:
        """Run one program (source text) to its end, its timeout or its output cap."""
        return self._execute(self.python, program)[0]

    def run_many(self, programs: Sequence[str], on_done: Callable[[int, ExecResult], None] | None = None) -> list[ExecResult]:
        """Run programs in parallel (config.workers, default one per core), results in input order;
        `on_done(index, result)` is called as each finishes (from one thread at a time)."""
        from concurrent.futures import ThreadPoolExecutor

        workers = self.config.workers or os.cpu_count() or 1
        results: list[ExecResult | None] = [None] * len(programs)
        lock = threading.Lock()

        def one(i: int) -> None:
            r = self.run(programs[i])
            with lock:
                results[i] = r
                if on_done is not None:
                    on_done(i, r)

        with ThreadPoolExecutor(max_workers=min(workers, max(1, len(programs)))) as pool:
            for f in [pool.submit(one, i) for i in range(len(programs))]:
                f.result()
        return results  # type: ignore[return-value]

    def _command(self, python: str, token: str) -> list[str]:
        c = self.config
        inner = [python, "-I", "-S", "-B", "-c", BOOT.replace("__TOKEN__", token),
                 str(c.cpu_seconds), str(c.memory_mb << 20), str(c.file_size_mb << 20), str(c.max_open_files),
                 str(c.max_processes)]
        return [self.unshare, *UNSHARE_FLAGS, "--", *inner] if self.isolated else inner

    def _execute(self, python: str, program: str) -> tuple[ExecResult, str]:
        token = "lmforge-sandbox-" + secrets.token_hex(12)
        workdir = tempfile.mkdtemp(prefix="lmforge-sandbox-")
        started = time.monotonic()
        try:
            with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
                f.write(program)
            drop = _run_as()
            if drop:
                os.chown(workdir, NOBODY, NOBODY)
            try:
                proc = subprocess.Popen(self._command(python, token), cwd=workdir, env=_env(workdir),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True, close_fds=True, **drop)
            except OSError as e:  # the interpreter (or unshare) cannot be started at all
                return ExecResult("failed", "sandbox_error", 0.0, f"{type(e).__name__}: {e}"), ""
            try:
                stdout, stderr, why = self._collect(proc, started + self.config.timeout)
            finally:
                _kill_group(proc)  # stragglers too (without a pid namespace they would outlive it)
                proc.wait()
                proc.stdout.close()  # type: ignore[union-attr]
                proc.stderr.close()  # type: ignore[union-attr]
        finally:
            _remove(workdir)
        result = _result(proc.returncode, stderr.decode("utf-8", errors="replace"), token, why,
                         time.monotonic() - started)
        return result, stdout.decode("utf-8", errors="replace")

    def _collect(self, proc: subprocess.Popen, deadline: float) -> tuple[bytes, bytes, str | None]:
        """Read stdout and stderr until both close, the deadline or the cap; (stdout's start,
        stderr's end, None | "timeout" | "output_limit")."""
        cap = self.config.max_output_kb << 10
        out, err, total = bytearray(), bytearray(), 0
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, out)  # type: ignore[arg-type]
        sel.register(proc.stderr, selectors.EVENT_READ, err)  # type: ignore[arg-type]
        exited_at = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    return bytes(out), bytes(err), "timeout"
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                    _kill_group(proc)  # whatever still holds the pipes
                elif exited_at is not None and now - exited_at > 2.0:
                    break  # an escaped process holds the pipes open: stop listening
                for key, _ in sel.select(min(deadline - now, 0.1)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    total += len(chunk)
                    buf = key.data
                    if buf is out:
                        out += chunk[: max(0, 4096 - len(out))]
                    else:
                        err += chunk
                        del err[:-_KEEP_STDERR]
                    if total > cap:
                        return bytes(out), bytes(err), "output_limit"
        finally:
            sel.close()
        return bytes(out), bytes(err), None


def _result(returncode: int | None, stderr: str, token: str, why: str | None, seconds: float) -> ExecResult:
    status = None
    at = stderr.rfind("\n" + token + " ")
    if at != -1:
        status = stderr[at + len(token) + 2:].split("\n", 1)[0].strip()
        after = stderr.find("\n", at + 1)
        stderr = stderr[:at] + (stderr[after:] if after != -1 else "")
    tail = stderr.strip()[-TAIL_CHARS:]
    if why is not None:
        failure = why
    elif status is not None and (status != "passed" or returncode == 0):
        failure = None if status == "passed" else status
    elif returncode is not None and returncode < 0:
        failure = _signal_failure(-returncode, tail)
    else:
        failure = f"exit:{returncode}"
    return ExecResult("passed" if failure is None else "failed", failure, seconds, tail, returncode)


def _signal_failure(sig: int, tail: str) -> str:
    if sig == signal.SIGXCPU:
        return "timeout"  # its CPU seconds ran out
    if sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) and (
            "MemoryError" in tail or "memory" in tail.lower()):
        return "memory"  # an allocation under RLIMIT_AS failed where Python could not raise
    try:
        return f"killed:{signal.Signals(sig).name}"
    except ValueError:
        return f"killed:{sig}"
