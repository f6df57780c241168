"""The frames a splice sends of its own, not relayed: PING answers and the drain's GOAWAYs.

A PING is about one connection, so the splice answers it on the side it came from
(relaying it would cost a crossing each way). Its own frames for one side wait for
the next frame boundary of the bytes relayed that way and ride with them; a PING
answer that finds no relayed bytes goes out on a short timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.h2.frames import ACK, GOAWAY_GRACEFUL, PING, frame

# Sent with the drain's first GOAWAY (GOAWAY_GRACEFUL): the caller's ACK comes after any
# call it started before it read the GOAWAY, so the last word (the GOAWAY naming the last
# stream) waits for the ACK.
DRAIN_OPAQUE = b"draining"
DRAIN_OPENING = (GOAWAY_GRACEFUL, frame(PING, 0, 0, DRAIN_OPAQUE))
# How long that wait lasts for a caller that does not answer pings.
DRAIN_PING_SECONDS = 1.0
# How long a caller cut for what it did has to read our last words (its GOAWAY), before
# the reset.
HANG_UP_SECONDS = 0.5


class OwnFrames:
    """Frames of the splice's own for one side, waiting for the next frame boundary of the
    bytes relayed that way, and the timer that sends PING answers which found no relayed
    bytes to ride with."""

    __slots__ = ("frames", "timer")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None

    def answer_ping(
        self, opaque: bytes, loop: asyncio.AbstractEventLoop, delay: float, send: Callable[[], None]
    ) -> None:
        """Queue the PING's ACK; `send` runs after `delay` if nothing has taken it by then."""
        self.frames.append(frame(PING, ACK, 0, opaque))
        if self.timer is None:
            self.timer = loop.call_later(delay, send)

    def take(self) -> list[bytes]:
        """The frames, now sent (with relayed bytes or on their own)."""
        self.cancel()
        frames, self.frames = self.frames, []
        return frames

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
