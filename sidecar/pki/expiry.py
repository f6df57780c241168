"""When a route's own certificate nears its end or passes it, say so in the log.

A WARNING once the certificate enters the last third of its lifetime or has less than
7 days left, whichever comes first; an ERROR at the moment it expires, repeated every
hour while it is still the one in use (peers refuse an expired certificate: every new
connection fails). Timers, not polling: each certificate costs two scheduled callbacks,
and a reload that swaps the certificate starts again with the new one.
"""

from __future__ import annotations

import asyncio
import datetime
import logging

from cryptography import x509

logger = logging.getLogger("sidecar.server")

_WARN_DAYS_LEFT = datetime.timedelta(days=7)
_EXPIRED_REPEAT_SECONDS = 3600.0


def warning_time(leaf: x509.Certificate) -> datetime.datetime:
    """When the WARNING is due: the start of the last third, or 7 days before the end,
    whichever comes first."""
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    return min(start + (end - start) * 2 / 3, end - _WARN_DAYS_LEFT)


class ExpiryWatch:
    """The expiry warnings of one route's current certificate."""

    def __init__(self, title: str) -> None:
        self._title = title
        self._timers: list[asyncio.TimerHandle] = []

    def watch(self, leaf: x509.Certificate) -> None:
        """Watch this certificate (the one now in use) instead of any before it."""
        self.stop()
        loop = asyncio.get_running_loop()
        now = datetime.datetime.now(datetime.timezone.utc)
        for due, say in (
            (warning_time(leaf), self._warn),
            (leaf.not_valid_after_utc, self._expired),
        ):
            delay = max((due - now).total_seconds(), 0.0)
            self._timers.append(loop.call_later(delay, say, leaf))

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _warn(self, leaf: x509.Certificate) -> None:
        left = leaf.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
        if left <= datetime.timedelta(0):
            return  # the ERROR says it
        logger.warning(
            "%s: certificate serial %x (%s) expires on %s UTC, in %s: renew it; the sidecar "
            "takes the new one on SIGHUP or at its next reload_interval check",
            self._title,
            leaf.serial_number,
            leaf.subject.rfc4514_string(),
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}",
            _duration(left),
        )

    def _expired(self, leaf: x509.Certificate) -> None:
        logger.error(
            "%s: certificate serial %x (%s) expired on %s UTC: peers refuse it, so new "
            "connections fail; renew it and reload (SIGHUP)",
            self._title,
            leaf.serial_number,
            leaf.subject.rfc4514_string(),
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}",
        )
        loop = asyncio.get_running_loop()
        # The warning's timer has run already (it is due earlier): only this one is left.
        self._timers = [loop.call_later(_EXPIRED_REPEAT_SECONDS, self._expired, leaf)]


def _duration(left: datetime.timedelta) -> str:
    if left >= datetime.timedelta(days=2):
        return f"{left.days} days"
    hours = left.total_seconds() / 3600
    return f"{hours:.1f} hours" if hours >= 1 else f"{left.total_seconds() / 60:.0f} minutes"
