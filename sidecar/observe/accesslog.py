"""The access log: one line per call, with method, caller, status, duration and bytes.

The method is the caller's `:path` and the peer its certificate's names: in the
text line both are escaped (`logs.escape`), so no caller can end the line early,
forge another, or pass one field for another; the JSON format carries them as
they are (json.dumps escapes).
"""

from __future__ import annotations

import logging
import time

from sidecar.observe.calls import NO_OBSERVER, CallObserver, CallRecord
from sidecar.observe.loglimit import LogLimiter
from sidecar.observe.logs import escape, info_writer

access_logger = logging.getLogger("sidecar.access")
# A denied caller's calls cost the sidecar next to nothing, so it can make thousands a
# second: their lines are rate limited per caller (the rest counted in a summary line).
_denied_calls = LogLimiter(access_logger)

# The part of a line that comes before the code: the same for every call of one method
# on one connection, so it is escaped and formatted once (by caller, method and route).
_PREFIXES_KEPT = 4096
_PREFIX_KEPT_BYTES = 512  # (a :path may be ~16 KB, escaped to six times that)


class AccessLog(CallObserver):
    """The access log as a route's call observer (one line per call, at INFO)."""

    observes = True

    def __init__(self) -> None:
        # Chosen once per route: the logging set-up is done before routes are built.
        self._write = info_writer(access_logger)
        self._prefixes: dict[tuple[str, str, str, str | None], str] = {}

    def call_ended(self, record: CallRecord) -> None:
        if not access_logger.isEnabledFor(logging.INFO):
            return  # a reload raised the log level
        duration_ms = (time.monotonic() - record.started) * 1000
        code = record.code._name_  # (the `name` property costs ~0.3 us)
        key = (record.method, record.peer, record.remote, record.route)
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = self._prefix(key)
        message = (
            f"{prefix}{code} duration_ms={duration_ms:.3f} "
            f"bytes_in={record.bytes_in} bytes_out={record.bytes_out}"
        )
        if record.details:
            message += f" details='{_quoted_text(record.details)}'"
        write = self._write
        if write is not None and code != "PERMISSION_DENIED":
            write.write(message, _fields(record, code, duration_ms) if write.structured else None)
        elif code == "PERMISSION_DENIED":
            # Rate limited per caller (see _denied_calls), the usual way: rare by design.
            fields = _fields(record, code, duration_ms)
            _denied_calls.log(logging.INFO, record.peer, "%s", message, extra={"fields": fields})
        else:
            access_logger.info("%s", message, extra={"fields": _fields(record, code, duration_ms)})

    def _prefix(self, key: tuple[str, str, str, str | None]) -> str:
        method, peer, remote, route = key
        prefix = (
            f"{_token(method)}{'' if route is None else f' route={_token(route)}'} "
            f"peer='{_quoted(peer)}' remote={_token(remote)} code="
        )
        if len(prefix) > _PREFIX_KEPT_BYTES:
            return prefix  # a long :path is formatted afresh each time, never kept
        if len(self._prefixes) >= _PREFIXES_KEPT:
            self._prefixes.clear()  # many callers or methods: format afresh
        self._prefixes[key] = prefix
        return prefix


def access_log() -> CallObserver:
    """The observer a route's calls go to: the access log when it is on (the logger is
    set up before routes start), else nothing, and the data planes skip the reading only
    the log needs."""
    return AccessLog() if access_logger.isEnabledFor(logging.INFO) else NO_OBSERVER


def _fields(record: CallRecord, code: str, duration_ms: float) -> dict[str, object]:
    """The line's fields for the JSON format."""
    fields: dict[str, object] = {
        "method": record.method,
        "peer": record.peer,
        "remote": record.remote,
        "code": code,
        "duration_ms": round(duration_ms, 3),
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
    }
    if record.route is not None:
        fields["route"] = record.route
    if record.details:
        fields["details"] = record.details
    return fields


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
