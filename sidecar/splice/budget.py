"""A rate budget: a token bucket on the event loop's clock.

A connection may spend `burst` at once and `rate` per second after that; work
that shows good faith (DATA relayed to a caller, which its WINDOW_UPDATEs and
PINGs answer) can earn tokens back. The splice keeps one for a caller's control
frames and one for the calls it cancels before their answer (rapid reset).
"""

from __future__ import annotations

import time


class BudgetExceeded(Exception):
    """A connection spent more than its budget allows: it is closed (GOAWAY
    ENHANCE_YOUR_CALM), and only it."""


class TokenBucket:
    """At most `burst` tokens, refilled at `rate` per second."""

    __slots__ = ("_burst", "_rate", "_tokens", "_updated")

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._updated = time.monotonic()

    def spend(self, tokens: float) -> bool:
        """Take tokens; False when the bucket cannot cover them (then it is left empty)."""
        if tokens <= self._tokens:  # the usual case: no clock read
            self._tokens -= tokens
            return True
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if tokens <= self._tokens:
            self._tokens -= tokens
            return True
        self._tokens = 0.0
        return False

    def earn(self, tokens: float) -> None:
        """Give tokens back (never above the burst)."""
        tokens += self._tokens
        self._tokens = tokens if tokens < self._burst else self._burst
