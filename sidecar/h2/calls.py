"""The per-call ledger of a spliced connection: one `Call` per HTTP/2 stream in flight,
and how its end reads to a gRPC client.

The splice keeps a Call for every request it relays, whether or not anything observes
calls: the drain, the idle timer and the answers it gives on a stream of its own need
them. What a call's client is told is read here from the wire, by gRPC's own tables:
grpc-status, else the HTTP :status, else the RST_STREAM error code. Message sizes are
walked from DATA payloads (gRPC's 5-byte message prefix) only when an observer wants
them (observe/calls.py).
"""

from __future__ import annotations

import time

import grpc

from sidecar.observe.calls import CallRecord

_STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
_STATUS_BY_TEXT = {str(number).encode(): code for number, code in _STATUS_BY_CODE.items()}
# Methods as text, by their `:path` bytes (decoded once, not per call).
_methods: dict[bytes, str] = {}
_METHODS_KEPT = 4096
_METHOD_KEPT_BYTES = 256
# How a gRPC client reads an RST_STREAM error code (the gRPC HTTP/2 spec's table).
_STATUS_BY_RESET = {
    0x0: grpc.StatusCode.INTERNAL,  # NO_ERROR before trailers
    0x7: grpc.StatusCode.UNAVAILABLE,  # REFUSED_STREAM
    0x8: grpc.StatusCode.CANCELLED,  # CANCEL
    0xB: grpc.StatusCode.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: grpc.StatusCode.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}
# How a gRPC client reads a response that ends without grpc-status (a server that is
# not gRPC, or a proxy's error page): "HTTP to gRPC Status Code Mapping" in gRPC's docs.
_STATUS_BY_HTTP = {
    b"400": grpc.StatusCode.INTERNAL,
    b"401": grpc.StatusCode.UNAUTHENTICATED,
    b"403": grpc.StatusCode.PERMISSION_DENIED,
    b"404": grpc.StatusCode.UNIMPLEMENTED,
    b"429": grpc.StatusCode.UNAVAILABLE,
    b"502": grpc.StatusCode.UNAVAILABLE,
    b"503": grpc.StatusCode.UNAVAILABLE,
    b"504": grpc.StatusCode.UNAVAILABLE,
}


class Call(CallRecord):
    """One gRPC call (an HTTP/2 stream) in flight: what ending it here needs to know, and
    its record for the route's observer (filled in when it is reported)."""

    __slots__ = (
        "answered",
        "http_status",
        "need_in",
        "need_out",
        "path",
        "prefix_in",
        "prefix_out",
        "request_ended",
    )  # fmt: skip

    def __init__(self, path: bytes | None, request_ended: bool) -> None:
        # (The record's other fields are set when the call is reported: most calls of a
        # route that nothing observes never are.)
        self.path = path
        self.started = time.monotonic()
        self.answered = False  # response headers have gone to the caller
        self.request_ended = request_ended  # the caller has sent END_STREAM
        self.bytes_in = self.bytes_out = 0
        self.http_status: bytes | None = None  # the response's :status, once it came
        # Message framing state per direction: body bytes still to skip, and the
        # part of a 5-byte message prefix seen so far.
        self.need_in = self.need_out = 0
        self.prefix_in = self.prefix_out = b""

    def __repr__(self) -> str:  # (the record's own reads fields set only once reported)
        return f"Call(path={self.path!r}, started={self.started})"


def method_of(path: bytes | None) -> str:
    """A call's method as text, from its `:path` (decoded once per distinct path)."""
    if not path:
        return "-"
    method = _methods.get(path)
    if method is None:
        method = path.decode("utf-8", "replace")
        if len(path) <= _METHOD_KEPT_BYTES:  # (a :path may be ~16 KB)
            if len(_methods) >= _METHODS_KEPT:
                _methods.clear()  # a caller trying many paths: decode afresh
            _methods[path] = method
    return method


def message_bytes(
    need: int, prefix: bytes, data: bytes, start: int, end: int
) -> tuple[int, int, bytes]:
    """Walk gRPC message framing (flag byte, 4-byte length, body) over data[start:end]:
    return the body bytes of the messages begun there, and the framing state after."""
    total, position = 0, start
    while position < end:
        if need:
            taken = min(need, end - position)
            need -= taken
            position += taken
        elif not prefix and end - position >= 5:
            need = int.from_bytes(data[position + 1 : position + 5], "big")
            total += need
            position += 5
        else:
            taken = min(5 - len(prefix), end - position)
            prefix += bytes(data[position : position + taken])
            position += taken
            if len(prefix) == 5:
                need = int.from_bytes(prefix[1:], "big")
                total += need
                prefix = b""
    return total, need, prefix


def status_code(grpc_status: bytes | None, http_status: bytes | None) -> grpc.StatusCode:
    """The status a gRPC client reads from a response's grpc-status, or else its :status."""
    known = _STATUS_BY_TEXT.get(grpc_status)  # type: ignore[arg-type]
    if known is not None:
        return known
    if grpc_status is not None:
        if grpc_status.isdigit():
            return _STATUS_BY_CODE.get(int(grpc_status), grpc.StatusCode.UNKNOWN)
        return grpc.StatusCode.UNKNOWN
    return _STATUS_BY_HTTP.get(http_status or b"", grpc.StatusCode.UNKNOWN)


def reset_status(error_code: int) -> grpc.StatusCode:
    """The status a gRPC client reads from an RST_STREAM with this error code."""
    return _STATUS_BY_RESET.get(error_code, grpc.StatusCode.INTERNAL)
