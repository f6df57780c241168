"""A listener's budgets for new connections: handshakes pending, connections open, descriptors.

Every connection costs the sidecar before anyone knows who opened it: a
descriptor, a TLS handshake, memory. A listener's `Admission` decides, for each
connection accepted, within the route's limits:

- handshakes in progress are capped (`max_pending_handshakes`): beyond, the
  oldest is closed, so that a flood of silent connections (each would hold its
  descriptor for `handshake_timeout`) cannot lock new callers out;
- connections, pending handshakes included, are capped (`max_connections`): at
  the cap, room is made at the expense of those who have not earned a place,
  the oldest pending handshake (no certificate shown yet), else the oldest
  denied caller's connection, so that neither silent sockets nor denied callers
  can fill the listener; with neither, a caller is answered UNAVAILABLE saying
  so (a few dozen at a time, as each costs a handshake; the others are closed
  at once);
- out of descriptors, the callers waiting in the listen queue are closed at
  once with a reserve descriptor (descriptors.py): they fail fast and retry,
  instead of waiting for their deadline, and the connections open are served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Final, Literal

import grpc

from sidecar.config.limits import Limits
from sidecar.host.descriptors import OUT_OF_DESCRIPTORS, ReserveDescriptor, open_file_limit
from sidecar.observe.calls import NO_OBSERVER, CallObserver
from sidecar.observe.loglimit import LogLimiter
from sidecar.splice.handshake import Handshake
from sidecar.splice.refusal import Refusal, told

logger = logging.getLogger("sidecar.server")
# What a flood repeats (out of descriptors, at a limit): one line per period.
_limited: Final = LogLimiter(logger, burst=1)

# Descriptors the process holds besides its connections (listeners, the event loop,
# logs, grpc's threads): a rough figure, for the start-up warning only.
_PROCESS_DESCRIPTORS = 64
# Callers beyond max_connections answered UNAVAILABLE at once (each costs a TLS
# handshake); those beyond are closed without a word.
_OVER_LIMIT_ANSWERED = 64

Verdict = Literal["serve", "refuse", "close"]


class Admission:
    """The budgets of one listener (see the module)."""

    def __init__(
        self, title: str, route: str | None, limits: Limits, observer: CallObserver = NO_OBSERVER
    ) -> None:
        self._title = title
        self._route = route
        self._limits = limits
        self._observer = observer
        # Handshakes in progress, oldest first, with the task running each.
        self._pending: dict[Handshake, asyncio.Task[Any]] = {}
        self._refusing = 0  # connections admitted beyond max_connections, not yet ended
        self._reserve: ReserveDescriptor | None = None

    def start(self) -> None:
        self._reserve = ReserveDescriptor()
        # A spliced caller holds two descriptors (its connection and the upstream's).
        fits = max(open_file_limit() - _PROCESS_DESCRIPTORS, 0) // 2
        if fits < self._limits.max_connections:
            logger.warning(
                "%s: the file descriptor limit fits about %d callers, fewer than "
                "max_connections (%d): beyond, new callers are closed at once",
                self._title,
                fits,
                self._limits.max_connections,
            )

    def stop(self) -> None:
        if self._reserve is not None:
            self._reserve.close()
            self._reserve = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def admit(
        self,
        open_connections: int,
        handshake: bool,
        evict_denied: Callable[[], str | None] = lambda: None,
    ) -> Verdict:
        """What becomes of a connection just accepted, with open_connections open (a
        connection that needs a handshake is counted as pending from now on);
        evict_denied closes the oldest denied caller's connection (its address, or None)."""
        limits = self._limits
        if handshake and len(self._pending) >= limits.max_pending_handshakes:
            self._close_oldest_pending("max_pending_handshakes", limits.max_pending_handshakes)
        served = open_connections + len(self._pending) - self._refusing
        if served < limits.max_connections:
            return "serve"
        if handshake and self._pending:
            self._close_oldest_pending("max_connections", limits.max_connections)
            return "serve"
        evicted = evict_denied()
        if evicted is not None:
            _limited.log(
                logging.WARNING,
                ("denied evicted", id(self)),
                "%s: at max_connections (%d): the oldest denied caller's connection, from "
                "%s, closed for a new caller",
                self._title,
                limits.max_connections,
                evicted,
            )
            return "serve"
        _limited.log(
            logging.WARNING,
            ("connections", id(self)),
            "%s: %d connections open (max_connections): new callers are refused",
            self._title,
            served,
        )
        if self._refusing >= _OVER_LIMIT_ANSWERED:
            return "close"
        self._refusing += 1
        return "refuse"

    def _close_oldest_pending(self, limit: str, value: int) -> None:
        oldest, task = next(iter(self._pending.items()))
        del self._pending[oldest]
        task.cancel()  # the event loop closes its connection
        _limited.log(
            logging.WARNING,
            ("pending", limit, id(self)),
            "%s: at %s (%d) with TLS handshakes pending: the oldest, from %s, closed",
            self._title,
            limit,
            value,
            oldest.remote,
        )

    def refusal_ended(self) -> None:
        """A connection admitted as "refuse" has ended (or never got its protocol)."""
        self._refusing -= 1

    def refusal(self, transport: asyncio.Transport, remote: str) -> Refusal:
        """The answer to a caller admitted beyond max_connections: UNAVAILABLE for the calls
        it sent, GOAWAY, and the close (its client retries, here or elsewhere)."""
        details = (
            f"sidecar at max_connections ({self._limits.max_connections}) "
            f"on {self._title}, try again later"
        )
        return Refusal(
            transport,
            grpc.StatusCode.UNAVAILABLE,
            told(details),
            peer="-",
            remote=remote,
            route=self._route,
            goaway=True,
            limits=self._limits,
            observer=self._observer,
        )

    def handshake_started(self, handshake: Handshake, task: asyncio.Task[Any]) -> None:
        self._pending[handshake] = task

    def handshake_ended(self, handshake: Handshake) -> None:
        self._pending.pop(handshake, None)

    def accept_failed(self, listener: socket.socket, error: OSError, open_connections: int) -> None:
        """accept() failed. Out of descriptors: the callers waiting are closed at once (they
        fail fast and retry, rather than wait for their deadline); the connections open
        keep being served."""
        if error.errno not in OUT_OF_DESCRIPTORS or self._reserve is None:
            _limited.log(
                logging.WARNING,
                ("accept", id(self), error.errno),
                "%s: accepting a connection failed: %s",
                self._title,
                error,
            )
            return
        shed = self._reserve.shed(listener)
        _limited.log(
            logging.WARNING,
            ("descriptors", id(self)),
            "%s: out of file descriptors (%s) with %d connections open and %d handshakes "
            "pending: new callers are closed at once until some end (%d so far)",
            self._title,
            os.strerror(error.errno or 0),
            open_connections,
            len(self._pending),
            shed,
        )
