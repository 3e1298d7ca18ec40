"""Shared by the benchmarks: run a measurement in a fresh process and track the peak RSS of its
whole process tree (workers included), and take medians."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_rss_bytes(pid: int) -> int:
    kids = _children()
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(kids.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_measured(code: str, env: dict | None = None, argv: list[str] | None = None, show_stderr: bool = False) -> dict:
    """Run `code` (which prints one JSON object last) in a fresh interpreter, or the command
    `argv` when given (a peer's own interpreter and script); add peak_rss_mb. `show_stderr`: the
    child's stderr goes to ours as it comes (progress of a long step) instead of being kept for
    the error message."""
    proc = subprocess.Popen(
        argv or [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
        stderr=None if show_stderr else subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "bench"), **(env or {})},
    )
    peak = 0

    def poll() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, tree_rss_bytes(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step failed:\n{err[-3000:]}" if err is not None else
                           f"benchmark step failed (exit status {proc.returncode}); its stderr is above")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak / 2**20, 1)
    return result


def median(values) -> float:
    return statistics.median(list(values))
