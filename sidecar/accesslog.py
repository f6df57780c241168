"""The access log: one line per call, with method, caller, status, duration and bytes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

access_logger = logging.getLogger("sidecar.access")


@dataclass(slots=True)
class CallRecord:
    """What the relay learns about one call while relaying it."""

    method: str
    started: float  # time.monotonic() at arrival
    remote: str = "-"  # the caller's address, as grpc names it (ipv4:127.0.0.1:53412)
    peer: str = "-"  # the caller's certificate identity, when the listener has one
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    messages_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    route: str | None = None  # the route's name, when the configuration names it


def log_call(record: CallRecord) -> None:
    """Write the access-log line for a finished call (fields also go to the JSON format)."""
    if not access_logger.isEnabledFor(logging.INFO):
        return
    duration_ms = (time.monotonic() - record.started) * 1000
    fields: dict[str, object] = {
        "method": record.method,
        "peer": record.peer,
        "remote": record.remote,
        "code": record.code.name,
        "duration_ms": round(duration_ms, 3),
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
    }
    route = ""
    if record.route is not None:
        fields["route"] = record.route
        route = f" route={record.route}"
    access_logger.info(
        "%s%s peer=%r remote=%s code=%s duration_ms=%.3f bytes_in=%d bytes_out=%d",
        record.method,
        route,
        record.peer,
        record.remote,
        record.code.name,
        duration_ms,
        record.bytes_in,
        record.bytes_out,
        extra={"fields": fields},
    )
