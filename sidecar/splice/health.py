"""The splice's own answers to grpc.health.v1.Health (`grpc_health: sidecar`): their frames,
and what a Watch call answered on a connection is owed.

With `grpc_health: sidecar` an ingress route answers the gRPC health service itself,
from its readiness, for apps that have none: `Check` gets one response and the
status, `Watch` gets the status now and again at each change, on a stream that stays
open. The answer is the same for every service name a caller asks about: the
sidecar knows its app as a whole, not the app's services.

The response message is dataplane.health_response's; here it gets its gRPC prefix
(not compressed, its length) and its frames.
"""

from __future__ import annotations

import grpc

from sidecar.dataplane import HEALTH_CHECK, HEALTH_WATCH, health_response
from sidecar.h2.calls import Call
from sidecar.h2.frames import DATA, RST_STREAM, frame, header_frames
from sidecar.h2.headerblock import RESPONSE_HEADERS, status_block

CHECK = HEALTH_CHECK.encode()
WATCH = HEALTH_WATCH.encode()

_MESSAGES = {
    serving: b"\x00" + len(health_response(serving)).to_bytes(4, "big") + health_response(serving)
    for serving in (True, False)
}
# What each status message costs the caller's flow-control windows, and the message
# bytes in it (what the access log and the metrics count).
MESSAGE_BYTES = len(_MESSAGES[True])
RESPONSE_BYTES = len(health_response(True))
_NO_ERROR = (0).to_bytes(4, "big")


class Watch:
    """A Watch call answered on a spliced connection: the status it was last told and the
    one it is to hear, and what it has of its stream's flow-control window."""

    __slots__ = ("call", "given", "messages", "now", "told")

    def __init__(self, call: Call, serving: bool) -> None:
        self.call = call
        self.now = serving  # the route's readiness, as last heard
        self.told: bool | None = None  # the status last sent (None: none yet)
        self.messages = 0
        self.given = 0  # the caller's window updates on the stream

    def window(self, initial: int) -> int:
        """What is left of the stream's window (the caller's initial window now, RFC 9113
        6.9.2, plus its updates, less what was sent)."""
        return initial + self.given - self.messages * MESSAGE_BYTES

    def sent(self) -> None:
        """One more status message, `now`, goes out on the stream."""
        self.told = self.now
        self.messages += 1
        self.call.bytes_out += RESPONSE_BYTES


def check_answer(stream_id: int, serving: bool, request_ended: bool) -> bytes:
    """A whole Check answer: the response, its status message, OK. A caller still sending
    is told to stop (RST_STREAM NO_ERROR, RFC 9113 8.1), as for any call answered here."""
    frames = (
        header_frames(stream_id, False, RESPONSE_HEADERS)
        + status_message(stream_id, serving)
        + header_frames(
            stream_id, True, status_block(grpc.StatusCode.OK.value[0], "", trailers_only=False)
        )
    )
    if not request_ended:
        frames += frame(RST_STREAM, 0, stream_id, _NO_ERROR)
    return frames


def watch_opening(stream_id: int, serving: bool) -> bytes:
    """The start of a Watch answer: the response, and the status now."""
    return header_frames(stream_id, False, RESPONSE_HEADERS) + status_message(stream_id, serving)


def status_message(stream_id: int, serving: bool) -> bytes:
    """One status message on a Watch (or Check) stream."""
    return frame(DATA, 0, stream_id, _MESSAGES[serving])


def message(serving: bool) -> bytes:
    """The status as a gRPC message (for an HTTP/2 library to send: splice/refusal.py)."""
    return _MESSAGES[serving]


def watch_end(stream_id: int, code: grpc.StatusCode, details: str, request_ended: bool) -> bytes:
    """The end of a Watch answer: its status (a Watch ends only when the sidecar stops
    answering it: the connection ends, or the sidecar shuts down)."""
    frames = header_frames(
        stream_id, True, status_block(code.value[0], details, trailers_only=False)
    )
    if not request_ended:
        frames += frame(RST_STREAM, 0, stream_id, _NO_ERROR)
    return frames
