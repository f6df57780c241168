"""The access log: one line per call, with method, caller, status, duration and bytes.

The method is the caller's `:path` and the peer its certificate's names: in the
text line both are escaped (`logs.escape`), so no caller can end the line early,
forge another, or pass one field for another; the JSON format carries them as
they are (json.dumps escapes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

from sidecar.observe.calls import CallRecord
from sidecar.observe.loglimit import LogLimiter
from sidecar.observe.logs import LineSink, escape, line_sink

access_logger = logging.getLogger("sidecar.access")
# A denied caller's calls cost the sidecar next to nothing, so it can make thousands a
# second: their lines are rate limited per caller (the rest counted in a summary line).
_denied_calls = LogLimiter(access_logger)

# The part of a line that is the same for every call of one method by one caller on one
# connection is formatted and escaped once, kept by (method, caller, address, route).
_HEADS_KEPT = 4096
_HEAD_KEPT_BYTES = 512  # (a :path may be ~16 KB, escaped to six times that)

_Key = tuple[str, str, str, "str | None"]

# Which worker writes the lines (runtime/workers.py), when there are several.
_worker: int | None = None


def set_worker(index: int) -> None:
    """Name this worker in every access line (`worker=N`; JSON: "worker"), from now on."""
    global _worker
    _worker = index


class AccessLog:
    """The access log: one line per call, at INFO (a batch observer, see calls.Batched)."""

    def __init__(self) -> None:
        # Chosen once per route: the logging set-up is done before routes are built.
        sink = line_sink(access_logger)
        self._lines: _Lines | None = None
        if sink is not None:
            self._lines = _JsonLines(sink) if sink.structured else _TextLines(sink)

    def calls_ended(self, records: Sequence[CallRecord]) -> None:
        if not access_logger.isEnabledFor(logging.INFO):
            return  # a reload raised the log level
        if self._lines is not None:
            self._lines.write(records)
        else:
            for record in records:
                log_usually(record)


def log_usually(record: CallRecord) -> None:
    """A call's line through `logging`, as any other record: for a denied call (rate
    limited per caller), or when the log goes elsewhere than LineSink writes."""
    code = record.code._name_
    duration_ms = (record.ended - record.started) * 1000
    message = f"{_prefix(record)}{code} {_numbers(record, duration_ms)}"
    if record.details:
        message += _details(record.details)
    fields = _fields(record, code, duration_ms)
    if code == "PERMISSION_DENIED":
        # Rate limited per caller (see _denied_calls): rare by design.
        _denied_calls.log(logging.INFO, record.peer, "%s", message, extra={"fields": fields})
    else:
        access_logger.info("%s", message, extra={"fields": fields})


class _Lines:
    """Access lines written straight to the log's handler (logs.LineSink), each built from
    the call's numbers and the heads kept for its (method, caller, address, route).

    The hot path of the access log: a batch of calls is written out in one loop per
    format, calling nothing per line that can be done without (on the machine measured,
    a Python call costs ~0.1 us and a whole line ~2 us)."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink
        self._heads: dict[_Key, tuple[str, str]] = {}

    def write(self, records: Sequence[CallRecord]) -> None:
        raise NotImplementedError

    def _new_heads(self, record: CallRecord, key: _Key) -> tuple[str, str]:
        heads = self._heads_of(record)
        if len(heads[0]) + len(heads[1]) <= _HEAD_KEPT_BYTES:  # a long :path: afresh
            if len(self._heads) >= _HEADS_KEPT:
                self._heads.clear()  # many callers or methods: format afresh
            self._heads[key] = heads
        return heads

    def _heads_of(self, record: CallRecord) -> tuple[str, str]:
        raise NotImplementedError

    def _denied(self, record: CallRecord, lines: list[str]) -> list[str]:
        """A denied call's line, the usual way, after the lines before it."""
        if lines:
            self._sink.queue("".join(lines), len(lines))
        log_usually(record)
        return []


class _TextLines(_Lines):
    """`<time> INFO sidecar.access: <method> route=.. peer='..' remote=.. code=OK ...`

    Its loop and _JsonLines' start alike (the head, the time, the duration): written out
    twice on purpose, since a shared generator or method would cost every line a call."""

    def write(self, records: Sequence[CallRecord]) -> None:
        heads, clock = self._heads, self._sink.clock
        wall = time.time() - time.monotonic()  # a record's wall time: its `ended` + wall
        lines: list[str] = []
        milli, stamp = -1, ""
        for record in records:
            code = record.code._name_
            if code == "PERMISSION_DENIED":
                lines = self._denied(record, lines)
                continue
            key = (record.method, record.peer, record.remote, record.route)
            head = (heads.get(key) or self._new_heads(record, key))[0]
            ended = record.ended
            if int((ended + wall) * 1000) != milli:
                milli = int((ended + wall) * 1000)
                stamp = clock.at_milli(milli)
            duration_ms = (ended - record.started) * 1000
            if record.details:
                lines.append(
                    f"{stamp}{head}{code} {_numbers(record, duration_ms)}"
                    f"{_details(record.details)}\n"
                )
            else:
                lines.append(
                    f"{stamp}{head}{code} duration_ms={duration_ms:.3f} "
                    f"bytes_in={record.bytes_in} bytes_out={record.bytes_out}\n"
                )
        if lines:
            self._sink.queue("".join(lines), len(lines))

    def _heads_of(self, record: CallRecord) -> tuple[str, str]:
        return f"{self._sink.after_time}{_prefix(record)}", ""


class _JsonLines(_Lines):
    """The object JsonFormatter writes for the same record (the fields of _fields). Its
    two heads: up to the message's code, and the fields of the key."""

    def write(self, records: Sequence[CallRecord]) -> None:
        heads, clock = self._heads, self._sink.clock
        before_time = self._sink.before_time
        wall = time.time() - time.monotonic()
        lines: list[str] = []
        milli, stamp = -1, ""
        for record in records:
            code = record.code._name_
            if code == "PERMISSION_DENIED":
                lines = self._denied(record, lines)
                continue
            key = (record.method, record.peer, record.remote, record.route)
            message_head, fields_head = heads.get(key) or self._new_heads(record, key)
            ended = record.ended
            if int((ended + wall) * 1000) != milli:
                milli = int((ended + wall) * 1000)
                stamp = clock.at_milli(milli)
            duration_ms = (ended - record.started) * 1000
            # The rest of the message is a code and numbers, which JSON leaves as they
            # are, and the details, escaped here.
            message = f"{code} {_numbers(record, duration_ms)}"
            details = ""
            if record.details:
                message = json.dumps(message + _details(record.details))[1:-1]
                details = f', "details": {json.dumps(record.details)}'
            lines.append(
                f'{before_time}{stamp}{message_head}{message}", {fields_head}'
                f'"code": "{code}", "duration_ms": {duration_ms:.3f}, '
                f'"bytes_in": {record.bytes_in}, "bytes_out": {record.bytes_out}{details}}}\n'
            )
        if lines:
            self._sink.queue("".join(lines), len(lines))

    def _heads_of(self, record: CallRecord) -> tuple[str, str]:
        fields = _key_fields(record)
        message_head = json.dumps(_prefix(record))[:-1]  # the string left open
        return f"{self._sink.after_time}{message_head}", f"{json.dumps(fields)[1:-1]}, "


def _prefix(record: CallRecord) -> str:
    """The text line's message up to its code: method, route, caller and address."""
    route = "" if record.route is None else f" route={_token(record.route)}"
    worker = "" if _worker is None else f" worker={_worker}"
    peer, remote = _quoted(record.peer), _token(record.remote)
    return f"{_token(record.method)}{route}{worker} peer='{peer}' remote={remote} code="


def _numbers(record: CallRecord, duration_ms: float) -> str:
    return f"duration_ms={duration_ms:.3f} bytes_in={record.bytes_in} bytes_out={record.bytes_out}"


def _details(details: str) -> str:
    return f" details='{_quoted_text(details)}'"


def access_log() -> AccessLog | None:
    """The access log, when it is on for a route that starts now (the logger is set up
    before routes start); else None, and the data planes skip the reading only the log
    needs (unless the metrics need it too)."""
    return AccessLog() if access_logger.isEnabledFor(logging.INFO) else None


def _fields(record: CallRecord, code: str, duration_ms: float) -> dict[str, object]:
    """The line's fields for the JSON format."""
    fields = _key_fields(record)
    fields.update(
        code=code,
        duration_ms=round(duration_ms, 3),
        bytes_in=record.bytes_in,
        bytes_out=record.bytes_out,
    )
    if record.details:
        fields["details"] = record.details
    return fields


def _key_fields(record: CallRecord) -> dict[str, object]:
    """The JSON fields that name the call: the same for a caller's calls of one method."""
    fields: dict[str, object] = {
        "method": record.method,
        "peer": record.peer,
        "remote": record.remote,
    }
    if record.route is not None:
        fields["route"] = record.route
    if _worker is not None:
        fields["worker"] = _worker
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
