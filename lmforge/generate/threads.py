"""How many threads the decode kernels use, chosen step by step from the steps' own times.

numba's OpenMP threads spin-wait at the end of every parallel loop (a decode step has ~200). On a
machine where another process wants a core (a browser, a build, the HTTP side of `lmforge serve`,
a test run), the thread that loses its core holds up the one that kept its own: measured on 2
cores beside one busy process, SmolLM2-135M Q4_1 decoded 14 tokens/s on 2 threads and 44 on 1
(77 on 2 threads when quiet). The kernels give each output to one thread, so the count changes
the speed only, never the numbers.

So: decode on every thread while steps run at their usual pace; when the recent steps run well
over the best recent pace, try one thread for a few steps and keep it if it is faster; from one
thread, try all of them again now and then.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class ThreadGovernor:
    full: int  # the thread count when the machine is quiet
    slow_factor: float = 1.5  # recent steps this much slower than the best recent one: try one thread
    probe_steps: int = 3  # steps a trial of the other count takes
    recheck_every: int = 64  # steps between trials (after a failed one, or while on one thread)
    window: int = 256  # steps the best recent full-thread time is taken over
    current: int = field(init=False)
    _rows: int = field(default=-1, init=False)
    _full_times: deque = field(init=False)
    _recent: dict = field(init=False)
    _trial: list = field(default_factory=list, init=False)
    _since_trial: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.current = self.full
        self._since_trial = self.recheck_every  # a first trial may come as soon as steps run slow
        self._full_times = deque(maxlen=self.window)
        self._recent = {self.full: deque(maxlen=4), 1: deque(maxlen=4)}

    @property
    def settled(self) -> int:
        """The count outside trials."""
        other = 1 if self.current == self.full else self.full
        return other if self._trial else self.current

    def threads(self) -> int:
        return self.current

    def record(self, rows: int, seconds: float) -> None:
        """A step of `rows` rows took `seconds` on `self.current` threads."""
        if self.full <= 1:
            return
        if rows != self._rows:  # another batch size: earlier times do not compare
            self._rows = rows
            self._full_times.clear()
            for times in self._recent.values():
                times.clear()
            if self._trial:  # a trial across batch sizes measures nothing: drop it
                self.current, self._trial = self.settled, []
        self._since_trial += 1
        if self.current == self.full:
            self._full_times.append(seconds)
        if self._trial:
            self._trial.append(seconds)
            if len(self._trial) > self.probe_steps:  # the trial's first step pays the switch: not counted
                self._end_trial()
            return
        recent = self._recent[self.current]
        recent.append(seconds)
        if len(recent) < recent.maxlen:
            return
        if self.current == self.full:
            slow = statistics.median(recent) > self.slow_factor * min(self._full_times)
            if slow and self._since_trial >= self.recheck_every:
                self._start_trial(1)
        elif self._since_trial >= self.recheck_every:
            self._start_trial(self.full)

    def _start_trial(self, threads: int) -> None:
        self.current = threads
        self._trial = [None]

    def _end_trial(self) -> None:
        tried = statistics.median(self._trial[2:] if len(self._trial) > 2 else self._trial[1:])
        settled = 1 if self.current == self.full else self.full
        if self._recent[settled] and tried < statistics.median(self._recent[settled]):
            self._recent[self.current].clear()
        else:
            self.current = settled
        self._trial = []
        self._since_trial = 0
