"""Logging set-up: human text or one JSON object per line, on stderr; caller text made safe.

Names, methods and reasons in log lines come from callers (a certificate's names,
a request's `:path`). In the text format they pass through `escape`, so that a
line feed cannot forge a line, an escape sequence cannot rewrite the terminal,
and a look-alike letter cannot pass for another: what is not printable ASCII is
shown as `\\xNN` / `\\uNNNN`, like repr without the quotes. Behind that, the text
formatter itself escapes whatever in a message is not printable (a library's
error quoting a caller's bytes, say), so every record is one line. The JSON
format escapes by itself (json.dumps, ASCII only).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import sys
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped_char(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if " " <= char <= "~":
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` in printable ASCII: backslash, controls and all non-ASCII escaped, as repr does.

    Two different texts never escape to the same line, and the result holds no line
    break of any kind (LF, CR, VT, FF, NEL, U+2028...), no terminal escape and no
    letter that only looks like an ASCII one.
    """
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to do, no copy
    return "".join(map(_escaped_char, text))


def _one_line(message: str) -> str:
    """message with what is not printable escaped; backslashes and letters left as they are
    (values escaped at their source keep their form)."""
    if message.isprintable():
        return message
    return "".join(char if char.isprintable() else _escaped_char(char) for char in message)


class TextFormatter(logging.Formatter):
    """The human format, one line per record (a traceback, the sidecar's own, follows it)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _one_line(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; structured fields (access log) become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            # RFC 3339, UTC, milliseconds: what log shippers parse without a pattern.
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ASCII only: NEL and U+2028 are line breaks to some readers, and json.dumps
        # leaves them raw otherwise; parsed, the line says the same.
        return json.dumps(entry)


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic at runtime only from 3.11
    """Lines logged during one turn of the event loop are written together, at its end.

    A StreamHandler writes and flushes every record: one system call per access-log
    line, which at thousands of calls a second costs more than relaying the calls.
    Records logged outside the event loop's thread (or with no loop running) are
    written at once, after anything still pending, so the order of lines holds.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        if len(self._pending) > 1:
            return  # a write is already scheduled
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop in this thread
            self._write_pending_locked()

    def _write_pending_locked(self) -> None:
        if self._pending:
            lines, self._pending = "".join(self._pending), []
            try:
                self.stream.write(lines)
                self.stream.flush()
            except Exception as error:
                # As StreamHandler does: report on stderr if it still works, never raise.
                # (Raised from a loop callback, the error would be logged, scheduling
                # another write that fails: a loop spinning for as long as stderr is gone.)
                self.handleError(
                    logging.makeLogRecord(
                        {"msg": "%d log lines lost: %s", "args": (lines.count("\n"), error)}
                    )
                )

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending_locked()
        finally:
            self.release()


def configure(log_format: LogFormat, level: str) -> None:
    """Send the sidecar's logs to stderr in the chosen format and level."""
    handler = BatchingHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(_TEXT_FORMAT))
    logging.getLogger().handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    """Log at this level from now on (at start-up, and when a reload changes log_level)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # The HTTP/2 and HPACK libraries log every frame and header at debug level.
    for chatty in ("hpack", "h2"):
        logging.getLogger(chatty).setLevel(max(logging.INFO, root.level))
