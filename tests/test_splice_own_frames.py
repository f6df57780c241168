"""The splice's own frames (PING answers, the drain's GOAWAYs), byte for byte, over
real socket pairs.

The splice answers a PING on the side it comes from, and the answer waits for the
next bytes relayed that way, so that it costs no write of its own: it must come
after a whole frame (never inside one), on a quiet connection it must come anyway
(after the wait), and a drain must not lose it. A drain's last GOAWAY must not
cut off a call that started as the last one ended, nor come before the caller answered
the drain's PING. Each test plays the caller and
the upstream on the far ends of two socket pairs, with a Splice in between.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import hpack
import uvloop

from sidecar.auth.headers import HeaderRules
from sidecar.h2.frames import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from sidecar.h2.headerblock import RequestFilter
from sidecar.splice.connection import Splice

SETTINGS_EMPTY = frame(SETTINGS, 0, 0, b"")
# What the splice sends on for an empty SETTINGS: HEADER_TABLE_SIZE (0x1) set to 0.
SETTINGS_ZERO_TABLE = frame(SETTINGS, 0, 0, (1).to_bytes(2, "big") + (0).to_bytes(4, "big"))
# To the caller, the upstream's SETTINGS also carry the sidecar's header-list limit.
SETTINGS_TO_CALLER = frame(
    SETTINGS,
    0,
    0,
    bytes.fromhex("000100000000") + (6).to_bytes(2, "big") + (16384).to_bytes(4, "big"),
)
# The drain's PING: its answer shows the caller has read the first GOAWAY.
DRAIN_PING = frame(PING, 0, 0, b"draining")
NEVER = 3600.0  # an ACK delay no test outlasts: the answer can only ride with relayed bytes


@dataclass
class Ends:
    """The test's ends of the two connections, and the splice between them."""

    caller: socket.socket
    upstream: socket.socket
    splice: Splice

    async def send(self, sock: socket.socket, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, data)

    async def receive(self, sock: socket.socket, count: int) -> bytes:
        """Exactly `count` bytes (fails after 10 s without them)."""
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < count:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, count - len(data)), 10)
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {count} bytes: {data!r}")
            data += chunk
        return data

    async def started(self) -> None:
        """Both sides have sent their preface and SETTINGS, and got them relayed."""
        await self.send(self.caller, PREFACE + SETTINGS_EMPTY)
        assert await self.receive(self.upstream, 39) == PREFACE + SETTINGS_ZERO_TABLE
        await self.send(self.upstream, SETTINGS_EMPTY)
        assert await self.receive(self.caller, 21) == SETTINGS_TO_CALLER


class _CallerProtocol(asyncio.Protocol):
    splice: Splice

    def data_received(self, data: bytes) -> None:
        self.splice.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.splice.connection_lost()


def run_spliced(test: Callable[[Ends], Awaitable[None]], ack_delay: float) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        caller_end, caller_side = socket.socketpair()
        upstream_end, upstream_side = socket.socketpair()
        for sock in (caller_end, upstream_end):
            sock.setblocking(False)
        transport, protocol = await loop.connect_accepted_socket(_CallerProtocol, caller_side)

        async def connect(factory: Callable[[], asyncio.Protocol]) -> tuple[object, object]:
            return await loop.connect_accepted_socket(factory, upstream_side)

        async def describe(error: BaseException | None) -> str:
            return str(error)

        protocol.splice = Splice(
            transport,
            connect,  # type: ignore[arg-type]
            describe,
            peer="CN=test",
            remote="unix:test",
            route=None,
            request_filter=RequestFilter(HeaderRules("sidecar/test")),
            ack_delay=ack_delay,
        )
        try:
            await test(Ends(caller_end, upstream_end, protocol.splice))
        finally:
            protocol.splice.abort()
            caller_end.close()
            upstream_end.close()

    uvloop.run(main())


def test_an_answer_rides_after_the_frame_being_relayed_never_inside_it() -> None:
    async def test(ends: Ends) -> None:
        await ends.started()
        await ends.send(ends.caller, frame(PING, 0, 0, b"caller-1"))
        data = frame(DATA, 0, 1, bytes(range(250)) * 4)
        await ends.send(ends.upstream, data[:100])
        # The first 100 bytes of the DATA frame come through, and nothing else:
        assert await ends.receive(ends.caller, 100) == data[:100]
        await ends.send(ends.upstream, data[100:])
        # ...and the answer follows the frame's last byte.
        answer = await ends.receive(ends.caller, len(data) - 100 + 17)
        assert answer == data[100:] + frame(PING, ACK, 0, b"caller-1")

        # The same the other way: the upstream's PING is answered with the caller's bytes.
        await ends.send(ends.upstream, frame(PING, 0, 0, b"upstream"))
        window_update = frame(WINDOW_UPDATE, 0, 0, (1000).to_bytes(4, "big"))
        await ends.send(ends.caller, window_update)
        answer = await ends.receive(ends.upstream, 13 + 17)
        assert answer == window_update + frame(PING, ACK, 0, b"upstream")

    run_spliced(test, ack_delay=NEVER)


def test_on_a_quiet_connection_the_answer_comes_after_the_wait() -> None:
    async def test(ends: Ends) -> None:
        await ends.started()
        await ends.send(ends.caller, frame(PING, 0, 0, b"keepaliv"))
        assert await ends.receive(ends.caller, 17) == frame(PING, ACK, 0, b"keepaliv")

    run_spliced(test, ack_delay=0.005)


def test_a_drain_sends_the_answers_waiting_before_its_last_goaway() -> None:
    async def test(ends: Ends) -> None:
        await ends.started()
        await ends.send(ends.caller, frame(PING, 0, 0, b"drained!"))
        # Wait until the splice has read the PING: the upstream sees the caller's next bytes.
        window_update = frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big"))
        await ends.send(ends.caller, window_update)
        # (the answer stays with the splice: it rides only towards the caller)
        assert await ends.receive(ends.upstream, 13) == window_update
        ends.splice.drain()  # no call in flight: the last word once the drain's PING is answered
        first = await ends.receive(ends.caller, 17 + 17 + 17)
        assert first == frame(PING, ACK, 0, b"drained!") + goaway(0x7FFFFFFF) + DRAIN_PING
        await ends.send(ends.caller, frame(PING, ACK, 0, b"draining"))
        assert await ends.receive(ends.caller, 17) == goaway(0)

    run_spliced(test, ack_delay=NEVER)


def request(encoder: hpack.Encoder, stream_id: int) -> bytes:
    block = encoder.encode(
        [(":method", "POST"), (":scheme", "https"), (":path", "/a.B/C"),
         (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]
    )  # fmt: skip
    return frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block)


def trailers(stream_id: int) -> bytes:
    block = hpack.Encoder().encode([(":status", "200"), ("grpc-status", "0")])
    return frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block)


def goaway(last_stream: int) -> bytes:
    return frame(GOAWAY, 0, 0, last_stream.to_bytes(4, "big") + bytes(4))


async def relayed_whole_frame(ends: Ends) -> bytes:
    """One frame as the upstream receives it."""
    header = await ends.receive(ends.upstream, 9)
    return header + await ends.receive(ends.upstream, int.from_bytes(header[:3], "big"))


def test_a_call_starting_as_the_last_one_ends_holds_the_drain_open() -> None:
    caller_headers = hpack.Encoder()

    async def test(ends: Ends) -> None:
        await ends.started()
        await ends.send(ends.caller, request(caller_headers, 1))
        await relayed_whole_frame(ends)  # call 1 reaches the app
        ends.splice.drain()
        assert await ends.receive(ends.caller, 34) == goaway(0x7FFFFFFF) + DRAIN_PING
        await ends.send(ends.caller, frame(PING, ACK, 0, b"draining"))  # answered at once
        # Call 1 ends and call 3 starts in the same turn of the loop (one read each).
        ends.splice.from_upstream(trailers(1))
        ends.splice.feed(request(caller_headers, 3))
        await relayed_whole_frame(ends)  # call 3 reaches the app...
        await ends.send(ends.upstream, trailers(3))  # ...which answers it
        # The connection stayed open for call 3: its answer comes, then the last GOAWAY.
        expected = trailers(1) + trailers(3) + goaway(3)
        assert await ends.receive(ends.caller, len(expected)) == expected

    run_spliced(test, ack_delay=NEVER)


def test_after_the_apps_goaway_the_drain_names_no_higher_stream() -> None:
    caller_headers = hpack.Encoder()

    async def test(ends: Ends) -> None:
        await ends.started()
        await ends.send(ends.caller, request(caller_headers, 1))
        await relayed_whole_frame(ends)
        await ends.send(ends.upstream, goaway(1))  # the app stops (graceful, or max age)
        assert await ends.receive(ends.caller, 17) == goaway(1)  # relayed unchanged
        ends.splice.drain()  # a GOAWAY(2^31-1) now would raise the id: none is sent
        await ends.send(ends.upstream, trailers(1))
        expected = trailers(1) + goaway(1)
        assert await ends.receive(ends.caller, len(expected)) == expected

    run_spliced(test, ack_delay=NEVER)
