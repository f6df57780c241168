"""Rate-limited log lines: at most a burst per key per period, the rest counted and summarised.

A denied caller can make thousands of calls a second and an unauthenticated one
thousands of handshakes; one WARNING each would let any peer write megabytes of
log a second (and drown the lines an operator needs). Lines that share a key (a
caller, a failure reason) get `burst` lines per `period`; the others are counted,
and when the period ends one line says how many were suppressed and what the
first of them said. No line is dropped without being counted in such a summary.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

# The key lines share once max_keys distinct keys are live: a peer inventing keys
# (a fresh certificate or reason per connection) ends up in one shared budget.
_OVERFLOW = object()

# Every limiter, so that the summaries still owed are written when the process exits.
_limiters: weakref.WeakSet[LogLimiter] = weakref.WeakSet()


@atexit.register  # runs before logging's own shutdown (atexit goes in reverse order)
def _flush_all() -> None:
    for limiter in list(_limiters):
        limiter.flush()


@dataclass(slots=True)
class _Window:
    """One key's current period: when it ends, what was logged and what was held back."""

    ends: float
    logged: int = 0
    suppressed: int = 0
    first_suppressed: str = ""
    level: int = logging.WARNING


class LogLimiter:
    """At most `burst` lines per key per `period` seconds; the rest are counted and, once the
    period ends, summarised in one line:
    '<N> more like "<first line>" suppressed in the last <period>s'.

    Summaries are written by a timer on the running event loop when one runs, else on the
    next call to `log` (or `flush`, or at exit). At most `max_keys` keys are tracked at a
    time; lines with further keys share one budget until a period ends.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        period: float = 10.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1:
            raise ValueError("burst should be at least 1")
        if period <= 0:
            raise ValueError("period should be positive")
        if max_keys < 1:
            raise ValueError("max_keys should be at least 1")
        self.logger = logger
        self.burst = burst
        self.period = period
        self.max_keys = max_keys
        self._clock = clock
        # Ordered by the end of each key's window (a window starts when its key is first
        # seen after the previous one ended), so the expired ones are always at the front.
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()
        self._lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        _limiters.add(self)

    def log(
        self,
        level: int,
        key: Hashable,
        msg: str,
        *args: object,
        extra: Mapping[str, object] | None = None,
        exc_info: bool = False,
    ) -> None:
        """Log `msg % args` at `level` unless `key` has used up its burst in this period.

        `extra` and `exc_info` go with the line when it is written (as Logger.log's), not
        with a summary.
        """
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        with self._lock:
            summaries = self._expire(now)
            window = self._windows.get(key)
            if window is None and len(self._windows) >= self.max_keys:
                key = _OVERFLOW
                window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(ends=now + self.period)
            if window.logged < self.burst:
                window.logged += 1
                emit = True
            else:
                emit = False
                window.suppressed += 1
                if window.suppressed == 1:
                    window.first_suppressed = msg % args if args else msg
                    window.level = level
                    self._schedule(window.ends - now)
        self._write(summaries)
        if emit:
            self.logger.log(level, msg, *args, extra=extra, exc_info=exc_info)

    def flush(self) -> None:
        """Write the summary of every line suppressed so far, now (at shutdown, say)."""
        with self._lock:
            summaries = [
                (window.level, self._summary(window))
                for window in self._windows.values()
                if window.suppressed
            ]
            self._windows.clear()
            self._cancel_timer()
        self._write(summaries)

    def _expire(self, now: float) -> list[tuple[int, str]]:
        """Drop the windows that have ended, returning the summaries they owe."""
        summaries = []
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if window.ends > now:
                break
            del self._windows[key]
            if window.suppressed:
                summaries.append((window.level, self._summary(window)))
        return summaries

    def _summary(self, window: _Window) -> str:
        return (
            f'{window.suppressed} more like "{window.first_suppressed}" suppressed'
            f" in the last {self.period:g}s"
        )

    def _write(self, summaries: list[tuple[int, str]]) -> None:
        for level, line in summaries:
            self.logger.log(level, "%s", line)

    def _schedule(self, delay: float) -> None:
        """Make sure a timer on the running loop (if any) writes the summary when it is due."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: the next call writes the summary
            return
        if self._timer is not None and self._timer_loop is loop and not loop.is_closed():
            return  # the pending timer reschedules itself for every window still owing one
        self._cancel_timer()
        self._timer = loop.call_later(max(delay, 0.0), self._on_timer)
        self._timer_loop = loop

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_loop = None

    def _on_timer(self) -> None:
        now = self._clock()
        with self._lock:
            self._timer = None
            self._timer_loop = None
            summaries = self._expire(now)
            owing = next((w for w in self._windows.values() if w.suppressed), None)
            if owing is not None:
                self._schedule(owing.ends - now)
        self._write(summaries)
