"""Progress bars that suit where stderr goes: tqdm's redrawn bar on a terminal, a plain line every
few seconds otherwise (CI, `nohup`, `| tee`, `> log`), where carriage-return frames would pile up
(~50 KB of them for a 6-minute quickstart)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 10.0  # between plain lines: ~36 lines for a 6-minute run


def progress_bar(*, total: float | None, desc: str, unit: str = "it", initial: float = 0, disable: bool = False,
                 unit_scale: bool = False, unit_divisor: int = 1000, leave: bool = True, file: TextIO | None = None):
    """A bar with tqdm's interface for what lmforge uses (update, set_postfix, n, total, refresh,
    close): tqdm when `file` (default stderr) is a terminal, else a `LineProgress`."""
    stream = file if file is not None else sys.stderr
    if disable:
        return tqdm(total=total, initial=initial, disable=True)
    if _is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                    unit_divisor=unit_divisor, leave=leave, file=stream, dynamic_ncols=True)
    return LineProgress(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                        unit_divisor=unit_divisor, file=stream)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """One plain line (desc, n/total, percent, rate, ETA, postfix) at most every `interval`
    seconds and one at the end; no carriage returns, no terminal width."""

    def __init__(self, *, total: float | None, desc: str, unit: str = "it", initial: float = 0,
                 unit_scale: bool = False, unit_divisor: int = 1000, file: TextIO | None = None,
                 interval: float = LINE_INTERVAL_S):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.unit_scale, self.unit_divisor = unit_scale, unit_divisor
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.postfix = ""
        self._initial = initial
        self._start = self._last = time.monotonic()
        self._closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())
        if refresh:
            self.refresh()

    def refresh(self) -> None:
        """Print a line if `interval` has passed since the last one."""
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print(time.monotonic(), final=True)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _amount(self, x: float) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(x, divisor=self.unit_divisor)
        return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"

    def _print(self, now: float, final: bool = False) -> None:
        elapsed = now - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self._amount(self.n)}"]
        if self.total:
            parts[0] += f"/{self._amount(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{self._amount(rate)} {self.unit}/s")
        if final:  # closed short of the total: an error or a stop, not "done"
            finished = not self.total or self.n >= self.total
            parts.append(f"{'done in' if finished else 'stopped after'} {tqdm.format_interval(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {tqdm.format_interval((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.file, flush=True)
