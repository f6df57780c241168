"""The access log: one line per call, with method, caller, status, duration and bytes.

The method is the caller's `:path` and the peer its certificate's names: in the
text line both are escaped (`logs.escape`), so no caller can end the line early,
forge another, or pass one field for another; the JSON format carries them as
they are (json.dumps escapes).
"""

from __future__ import annotations

import logging
import time

import grpc

from sidecar.observe.calls import NO_OBSERVER, CallObserver, CallRecord
from sidecar.observe.loglimit import LogLimiter
from sidecar.observe.logs import escape

access_logger = logging.getLogger("sidecar.access")
# A denied caller's calls cost the sidecar next to nothing, so it can make thousands a
# second: their lines are rate limited per caller (the rest counted in a summary line).
_denied_calls = LogLimiter(access_logger)

_LINE = "%s%s peer='%s' remote=%s code=%s duration_ms=%.3f bytes_in=%d bytes_out=%d"


class AccessLog(CallObserver):
    """The access log as a route's call observer (one line per call, at INFO)."""

    observes = True

    def call_ended(self, record: CallRecord) -> None:
        log_call(record)


def access_log() -> CallObserver:
    """The observer a route's calls go to: the access log when it is on (the logger is
    set up before routes start), else nothing, and the data planes skip the reading only
    the log needs."""
    return AccessLog() if access_logger.isEnabledFor(logging.INFO) else NO_OBSERVER


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
    args: tuple[object, ...] = (
        _token(record.method),
        route,
        _quoted(record.peer),
        _token(record.remote),
        record.code.name,
        duration_ms,
        record.bytes_in,
        record.bytes_out,
    )
    line = _LINE
    if record.details:
        fields["details"] = record.details
        line += " details='%s'"
        args += (_quoted_text(record.details),)
    if record.code is grpc.StatusCode.PERMISSION_DENIED:
        _denied_calls.log(logging.INFO, record.peer, line, *args, extra={"fields": fields})
    else:
        access_logger.info(line, *args, extra={"fields": fields})


def _token(text: str) -> str:
    """`text` escaped as one space-free word of the line (`:path` may hold anything)."""
    escaped = escape(text)
    return escaped.replace(" ", "\\x20") if " " in escaped else escaped


def _quoted(peer: str) -> str:
    """The inside of `peer='...'`: a description is escaped already (its backslashes
    doubled), so only quotes are added."""
    if not (peer.isascii() and peer.isprintable()):
        peer = escape(peer)
    return peer.replace("'", "\\'") if "'" in peer else peer


def _quoted_text(text: str) -> str:
    """The inside of `details='...'`: any text, escaped (backslashes doubled, so that a
    backslash before a quote cannot end the field early), then its quotes."""
    text = escape(text)
    return text.replace("'", "\\'") if "'" in text else text
