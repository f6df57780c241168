"""Tools for the hostile-peer suite: raw HTTP/2 over mTLS, and what the sidecar costs.

An attack here is a caller that speaks HTTP/2 frame by frame (`RawPeer`), so it
can send what no gRPC library would. Alongside, a well-behaved caller measures
service (`ping_round_trip`: the sidecar's own answer to a PING on a fresh
connection, which no upstream helps with; `unary_ok`: a real call), and
`Footprint` reads the sidecar process's resident memory and open descriptors
from /proc.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import hpack

from sidecar.h2.frames import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from tests.conftest import Pki, SidecarProcess

__all__ = [
    "ACK",
    "CONTINUATION",
    "DATA",
    "END_HEADERS",
    "END_STREAM",
    "GOAWAY",
    "HEADERS",
    "METHOD",
    "PING",
    "RST_STREAM",
    "SETTINGS",
    "WINDOW_UPDATE",
    "Footprint",
    "RawPeer",
    "eventually",
    "frame",
    "message",
    "ping_round_trip",
    "request_block",
    "unary_ok",
]

METHOD = "/probe.Probe/Unary"


@functools.lru_cache(maxsize=32)  # building one costs ~6 ms; tests open hundreds of connections
def client_context(pki: Pki, client: str | None) -> ssl.SSLContext:
    """A TLS client context like a gRPC client's: ALPN h2, the test CA, `client`'s certificate."""
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.pem"))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(pki.cert(client), pki.key(client))
    return context


def request_block(
    method: str = METHOD,
    extra: tuple[tuple[str, str], ...] = (),
    encoder: hpack.Encoder | None = None,
) -> bytes:
    """A gRPC request's header block (stateless unless an encoder with a table is given)."""
    if encoder is None:
        encoder = hpack.Encoder()
        encoder.header_table_size = 0
    headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", method),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]
    return bytes(encoder.encode(headers))


def message(payload: bytes = b"") -> bytes:
    """One gRPC message: uncompressed flag, length, payload."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class RawPeer:
    """A caller speaking raw HTTP/2 to a sidecar: TLS (or plain, for egress), frame by frame."""

    def __init__(
        self,
        port: int,
        pki: Pki | None = None,
        client: str | None = "alice",
        *,
        timeout: float = 10.0,
        preface: bool = True,
        session: ssl.SSLSession | None = None,
    ) -> None:
        """session: a TLS session of an earlier peer's, to resume."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if pki is not None:
            self.sock: socket.socket = client_context(pki, client).wrap_socket(
                raw, server_hostname="localhost", session=session
            )
        else:
            self.sock = raw
        self._buffer = b""
        self._decoder = hpack.Decoder()
        if preface:
            self.send(PREFACE + frame(SETTINGS, 0, 0, b""))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.send(frame(kind, flags, stream_id, payload))

    def call(self, stream_id: int, method: str = METHOD, body: bytes | None = b"") -> None:
        """Start a unary call on stream_id (and end its request, unless body is None)."""
        ends = body is None
        self.send_frame(HEADERS, END_HEADERS | (END_STREAM if ends else 0), stream_id,
                        request_block(method))  # fmt: skip
        if body is not None:
            self.send_frame(DATA, END_STREAM, stream_id, message(body))

    def read_frame(self) -> tuple[int, int, int, bytes] | None:
        """The next frame (kind, flags, stream id, payload); None once the connection ends."""
        while True:
            if len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) >= 9 + length:
                    head, self._buffer = self._buffer[: 9 + length], self._buffer[9 + length :]
                    stream_id = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                    return head[3], head[4], stream_id, head[9:]
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionError, ssl.SSLError):
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def read_until(self, kind: int, stream_id: int | None = None) -> tuple[int, int, bytes] | None:
        """Read up to the first frame of `kind` (on stream_id if given): flags, stream, payload."""
        while (read := self.read_frame()) is not None:
            got_kind, flags, got_stream, payload = read
            if got_kind == kind and stream_id in (None, got_stream):
                return flags, got_stream, payload
        return None

    def settle(self) -> None:
        """Read the sidecar's SETTINGS and acknowledge them, as every client does (after which
        the client's header blocks stand alone: no HPACK table)."""
        assert self.read_until(SETTINGS) is not None, "no SETTINGS from the sidecar"
        self.send_frame(SETTINGS, ACK, 0)

    def status(self, stream_id: int) -> dict[str, str]:
        """The fields of the block that ends stream_id (trailers, or trailers-only)."""
        decoder = self._decoder
        while (read := self.read_frame()) is not None:
            kind, flags, got_stream, payload = read
            if kind == HEADERS and got_stream == stream_id:
                fields = {name: value for name, value in decoder.decode(payload)}
                if flags & END_STREAM:
                    return fields
            elif kind == HEADERS:
                decoder.decode(payload)  # another stream's: the table must follow
        raise AssertionError(f"the connection ended before stream {stream_id} did")

    def goaway(self) -> tuple[int, int, bytes] | None:
        """The next GOAWAY: (last stream id, error code, debug data), or None if the
        connection ends without one."""
        read = self.read_until(GOAWAY)
        if read is None:
            return None
        payload = read[2]
        last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        return last, int.from_bytes(payload[4:8], "big"), payload[8:]

    def closed_within(self, seconds: float) -> bool:
        """Whether the sidecar ends the connection within `seconds` (frames read are dropped)."""
        # The shorter timeout is this wait's only: reads after it keep the peer's own.
        previous = self.sock.gettimeout()
        self.sock.settimeout(seconds)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                if self.read_frame() is None:
                    return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(previous)
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def ping_round_trip(port: int, pki: Pki | None, client: str | None = "alice") -> float:
    """Seconds from a PING to its ACK on a fresh connection: how responsive the sidecar is.

    Includes the TLS handshake's wait for the sidecar's first bytes, so it measures
    the event loop's latency twice over; only the PING's own round trip is returned.
    """
    with RawPeer(port, pki, client) as peer:
        assert peer.read_until(SETTINGS) is not None, "no SETTINGS from the sidecar"
        started = time.monotonic()
        peer.send_frame(PING, 0, 0, b"measure!")
        while (read := peer.read_until(PING)) is not None:
            if read[0] & ACK and read[2] == b"measure!":
                return time.monotonic() - started
        raise AssertionError("the sidecar closed the connection instead of answering the PING")


def unary_ok(sidecar: SidecarProcess, pki: Pki, timeout: float = 5.0) -> bool:
    """Whether a well-behaved caller's unary call succeeds within timeout."""
    with sidecar.channel(pki) as channel:
        call = channel.unary_unary(METHOD)
        try:
            call(b"ping", timeout=timeout)
        except grpc.RpcError:
            return False
        return True


def eventually(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether condition holds within seconds, checked every 50 ms: for state that nothing
    announces (a process's memory and descriptors in /proc, a caller served again)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Footprint:
    """A process's resident memory and open descriptors, read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    @property
    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    @property
    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))
