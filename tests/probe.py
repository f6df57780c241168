"""The probe: a real plaintext gRPC upstream whose behaviour each call chooses by metadata.

It speaks raw bytes (no protobuf), like the sidecar, and records what it saw, so
a test can assert both what the client got and what reached the upstream.

Request metadata understood (all optional):
  x-probe-status: N         end with status code N (1..16) ...
  x-probe-details: TEXT     ... and these details (empty if absent; or UTF-8 in -bin)
  x-probe-rich              ... and a google.rpc.Status in grpc-status-details-bin
  x-probe-headers           send response headers (x-up-init, x-up-init-bin) first
  x-probe-trailers          set trailers (x-up-trail, x-up-trail-bin)
  x-probe-count: N          ServerStream: number of messages
  x-probe-gate: NAME        after headers, wait until the test opens gate NAME
  x-probe-barrier: NAME     Unary: wait until all parties of barrier NAME arrived
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

SERVICE = "probe.Probe"
INIT_HEADERS = (("x-up-init", "hello"), ("x-up-init-bin", b"\x01\x02\x00"))
TRAILERS = (("x-up-trail", "bye"), ("x-up-trail-bin", b"\x00\xff\x10"))


# The longest a call waits on a gate (longer than any test: pytest-timeout is 120 s).
_GATE_LIMIT_SECONDS = 180.0


@dataclass
class SeenCall:
    """What the upstream observed about one call."""

    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    time_remaining: float | None
    ended: threading.Event = field(default_factory=threading.Event)  # the RPC terminated
    # For a call held at a gate: `woke` is set once the handler knows whether the
    # gate opened or the call ended first (`cancelled`: cancel, deadline, reset).
    woke: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    requests: list[bytes] = field(default_factory=list)

    def md(self, key: str) -> list[str | bytes]:
        return [value for k, value in self.metadata if k == key]


class Probe:
    """The upstream service, its gates and barriers, and the log of calls it saw."""

    def __init__(self) -> None:
        self.calls: list[SeenCall] = []
        self.call_arrived = threading.Condition()
        self._gates: dict[str, threading.Event] = {}
        self._barriers: dict[str, threading.Barrier] = {}
        self._lock = threading.Lock()
        self.server: grpc.Server | None = None
        self.port = 0

    # --- control from tests -------------------------------------------------
    def gate(self, name: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(name, threading.Event())

    def barrier(self, name: str, parties: int) -> None:
        with self._lock:
            self._barriers[name] = threading.Barrier(parties, timeout=30)

    def wait_for_calls(self, count: int, timeout: float = 10) -> list[SeenCall]:
        with self.call_arrived:
            if not self.call_arrived.wait_for(lambda: len(self.calls) >= count, timeout):
                raise AssertionError(f"upstream saw {len(self.calls)} calls, expected {count}")
            return list(self.calls)

    def start(self, port: int = 0, options: Sequence[tuple[str, int]] = ()) -> int:
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=256),
            handlers=[self._handlers()],
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1),
                ("grpc.so_reuseport", 0),
                *options,
            ],
        )
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()
        return self.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None).wait()
            self.server = None

    # --- the service --------------------------------------------------------
    def _seen(self, method: str, context: grpc.ServicerContext) -> SeenCall:
        call = SeenCall(method, tuple(context.invocation_metadata()), context.time_remaining())
        context.add_callback(call.ended.set)
        with self.call_arrived:
            self.calls.append(call)
            self.call_arrived.notify_all()
        return call

    def _wait_gate(self, call: SeenCall, context: grpc.ServicerContext) -> None:
        names = call.md("x-probe-gate")
        if not names:
            return
        gate = self.gate(str(names[0]))
        # Wake on the gate or on the call ending (cancel, deadline), whichever is first. A
        # call already over cannot take the callback (it would never run): it does not wait.
        # The wait is bounded too: a worker waiting forever would keep the test process
        # from exiting (concurrent.futures joins its workers at exit).
        if context.add_callback(gate.set):
            gate.wait(_GATE_LIMIT_SECONDS)
        call.cancelled = not context.is_active()
        call.woke.set()

    def _begin(self, call: SeenCall, context: grpc.ServicerContext) -> None:
        if call.md("x-probe-headers"):
            context.send_initial_metadata(INIT_HEADERS)
        if call.md("x-probe-trailers"):
            context.set_trailing_metadata(TRAILERS)
        self._wait_gate(call, context)

    def _finish(self, call: SeenCall, context: grpc.ServicerContext) -> None:
        codes = call.md("x-probe-status")
        if not codes:
            return
        code = next(c for c in grpc.StatusCode if c.value[0] == int(codes[0]))
        details = ""
        if call.md("x-probe-details"):
            details = str(call.md("x-probe-details")[0])
        elif call.md("x-probe-details-bin"):  # UTF-8 details (text metadata is ASCII only)
            details = bytes(call.md("x-probe-details-bin")[0]).decode()
        if call.md("x-probe-rich"):
            info = any_pb2.Any()
            info.Pack(error_details_pb2.ErrorInfo(reason="QUOTA", domain="probe.example"))
            status = status_pb2.Status(code=code.value[0], message=details, details=[info])
            context.abort_with_status(rpc_status.to_status(status))
        context.abort(code, details)

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        call = self._seen("Unary", context)
        call.requests.append(request)
        barrier = call.md("x-probe-barrier")
        if barrier:
            try:
                self._barriers[str(barrier[0])].wait()
            except threading.BrokenBarrierError:
                context.abort(grpc.StatusCode.ABORTED, "barrier broken: calls were not concurrent")
        self._begin(call, context)
        self._finish(call, context)
        return request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        call = self._seen("ServerStream", context)
        call.requests.append(request)
        self._begin(call, context)
        count = int(call.md("x-probe-count")[0]) if call.md("x-probe-count") else 3
        for index in range(count):
            yield request + str(index).encode()
        self._finish(call, context)

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        call = self._seen("ClientStream", context)
        self._begin(call, context)
        for request in requests:
            call.requests.append(request)
        self._finish(call, context)
        return b"".join(call.requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        call = self._seen("Bidi", context)
        self._begin(call, context)
        for request in requests:
            call.requests.append(request)
            yield request
        self._finish(call, context)

    def _handlers(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, Any] = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)
