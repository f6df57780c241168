"""Answering every call on a connection with one gRPC status, without any upstream.

The spliced data plane never parses a caller's HTTP/2 beyond frame boundaries
and header blocks. A connection it will not splice (a caller the allowlist
denies, or one whose upstream cannot be reached) is instead handed to a
`Refusal`, which speaks HTTP/2 through the h2 library and answers each call
with a trailers-only response: the status and a message saying why, exactly
as a gRPC server would. Nothing reaches the upstream.

A refusal for PERMISSION_DENIED keeps the connection (the caller's next calls
get the same answer, as from any gRPC server). One for UNAVAILABLE answers the
calls already sent, then sends GOAWAY so that the caller's next call opens a
new connection, which tries the upstream again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from sidecar.accesslog import CallRecord, log_call
from sidecar.loglimit import LogLimiter

logger = logging.getLogger("sidecar.server")
# A line per denied call would let a denied caller write the log at its call rate.
_denials = LogLimiter(logger)

# After a GOAWAY, how long the caller has to read the answers and close.
_LINGER_SECONDS = 10.0


def grpc_message(details: str) -> bytes:
    """The grpc-message value for details: percent-encoded UTF-8, as the gRPC spec says."""
    encoded = bytearray()
    for byte in details.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:  # printable ASCII except '%'
            encoded.append(byte)
        else:
            encoded += b"%%%02X" % byte
    return bytes(encoded)


class Refusal:
    """One caller connection on which every call gets `code` and `details(method)`."""

    def __init__(
        self,
        transport: asyncio.Transport,
        code: grpc.StatusCode,
        details: Callable[[str], str],
        *,
        peer: str,
        remote: str,
        route: str | None,
        goaway: bool,
    ) -> None:
        self._transport = transport
        self._code = code
        self._details = details
        self._peer, self._remote, self._route = peer, remote, route
        self._goaway = goaway
        self._connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self._connection.initiate_connection()
        self._flush()
        self._goaway_sent = False
        self._linger: asyncio.TimerHandle | None = None
        if goaway:  # a caller that sends no call, or keeps the connection, is closed
            self._linger = asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.abort)

    def feed(self, data: bytes) -> None:
        """Answer what the caller sent; a caller breaking HTTP/2 loses the connection."""
        if self._goaway_sent:
            # Frames for calls already answered, or calls after the last one answered (the
            # caller retries those elsewhere): h2 would call any frame now a protocol error.
            return
        try:
            events = self._connection.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            logger.info("caller %s broke HTTP/2: %s", self._remote, error)
            self._flush()
            self._transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._answer(event.stream_id, event.headers, event.stream_ended is not None)
            elif isinstance(event, h2.events.DataReceived):
                # Discard, but keep the caller's flow-control window open.
                self._connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._transport.close()
        answered = self._connection.highest_inbound_stream_id
        if self._goaway and answered and not self._goaway_sent:
            # Calls sent after these are not processed: the caller retries them elsewhere.
            self._connection.close_connection(last_stream_id=answered)
            self._goaway_sent = True
        self._flush()

    def connection_lost(self) -> None:
        if self._linger is not None:
            self._linger.cancel()

    def _answer(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        started = time.monotonic()
        method = next((value for name, value in headers if name == b":path"), b"").decode(
            "utf-8", "replace"
        )
        details = self._details(method)
        if self._code == grpc.StatusCode.PERMISSION_DENIED:
            _denials.log(logging.WARNING, self._peer, "denied: %s", details)
        code = self._code
        try:
            self._connection.send_headers(
                stream_id,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", str(code.value[0]).encode()),
                    (b"grpc-message", grpc_message(details)),
                ],
                end_stream=True,
            )
        except (h2.exceptions.StreamClosedError, h2.exceptions.StreamIDTooLowError):
            # The caller reset the call in the same read (a deadline already past, say);
            # h2 forgets a closed stream once a later one opens.
            code, ended = grpc.StatusCode.CANCELLED, True
        if not ended:
            # The caller may still be sending; tell it to stop (RFC 9113 8.1). Its
            # END_STREAM may already be in this read, which closed the stream.
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self._connection.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        log_call(
            CallRecord(
                method=method,
                started=started,
                remote=self._remote,
                peer=self._peer,
                code=code,
                route=self._route,
            )
        )

    def _flush(self) -> None:
        outgoing = self._connection.data_to_send()
        if outgoing and not self._transport.is_closing():
            self._transport.write(outgoing)
