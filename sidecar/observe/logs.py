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
import time
from collections.abc import Callable
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

_FLUSH_SECONDS = 0.01  # how long a log line may wait to be written with others
_FLUSH_LINES = 1000  # lines that are written at once, without waiting

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


class _SecondClock:
    """A line's time, rendered once a second, its milliseconds taken from a table: the
    access log writes thousands of lines a second, and strftime costs ~3 us."""

    def __init__(self, render: Callable[[int], str], millis: str) -> None:
        self._render = render  # the second's text
        self._millis = [millis % number for number in range(1000)]  # what follows it
        self._second = -1
        self._text = ""

    def __call__(self, when: float) -> str:
        return self.at_milli(int(when * 1000))

    def at_milli(self, milli: int) -> str:
        """The time `milli` milliseconds after the epoch."""
        second, rest = divmod(milli, 1000)
        if second != self._second:
            self._second, self._text = second, self._render(second)
        return self._text + self._millis[rest]


class TextFormatter(logging.Formatter):
    """The human format, one line per record (a traceback, the sidecar's own, follows it)."""

    def __init__(self, fmt: str = _TEXT_FORMAT) -> None:
        super().__init__(fmt)
        self.clock = _SecondClock(
            lambda second: time.strftime(self.default_time_format, self.converter(second)),
            ",%03d",  # as logging.Formatter.default_msec_format
        )
        self._standard = fmt == _TEXT_FORMAT  # the layout info_layout describes

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _one_line(record.message)
        return super().formatMessage(record)

    def info_layout(self, logger: str) -> tuple[str, str] | None:
        """What comes before and after the time in an INFO line of `logger`, up to its
        message (see LineSink); None when this formatter's format is not the standard one."""
        if not self._standard:
            return None
        return "", f" INFO {logger}: "


def _rfc3339_second(second: int) -> str:
    # RFC 3339, UTC, milliseconds: what log shippers parse without a pattern.
    moment = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; structured fields (access log) become top-level keys."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = _SecondClock(_rfc3339_second, ".%03dZ")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.clock(record.created),
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

    def info_layout(self, logger: str) -> tuple[str, str]:
        """What comes before and after the time in an INFO record of `logger`, up to the
        JSON string of its message (see LineSink)."""
        after = json.dumps({"level": "INFO", "logger": logger, "message": ""})
        return '{"time": "', '", ' + after[1 : -len('""}')]


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic at runtime only from 3.11
    """Lines logged on the event loop are written together, at most _FLUSH_SECONDS later.

    A StreamHandler writes and flushes every record: one system call per access-log
    line, which at thousands of calls a second costs more than relaying the calls (and
    one write per turn of the loop still cost ~5 us a call in `make bench`). Records
    logged outside the event loop's thread (or with no loop running) are written at
    once, after anything still pending, so the order of lines holds; so are
    _FLUSH_LINES lines in waiting. What is pending at exit is written by logging's own
    shutdown (it flushes every handler).
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: now, after what is pending
            self._pending.append(line)
            self._write_pending_locked()
            return
        self.queue(line)

    def queue(self, text: str, lines: int = 1) -> None:
        """Write formatted lines (their terminators included) with the others of this turn;
        from the event loop's thread (emit() checks for others; the access log is there)."""
        pending = self._pending
        pending.append(text)
        self._pending_lines += lines
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_later(_FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no loop after all
                self._write_pending_locked()
        elif self._pending_lines >= _FLUSH_LINES:
            self._write_pending_locked()  # (the timer then finds nothing, or a new line)

    def _write_pending_locked(self) -> None:
        if self._pending:
            lines, self._pending, self._pending_lines = "".join(self._pending), [], 0
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
        handler.setFormatter(TextFormatter())
    logging.getLogger().handlers[:] = [handler]
    set_level(level)


def write_lines(text: str) -> None:
    """Whole lines formatted elsewhere (a worker's, runtime/workers.py), written in turn
    with this process's own; from the event loop's thread."""
    handlers = logging.getLogger().handlers
    if len(handlers) == 1 and isinstance(handlers[0], BatchingHandler):
        handlers[0].queue(text, text.count("\n"))
    else:
        sys.stderr.write(text)
        sys.stderr.flush()


def set_level(level: str) -> None:
    """Log at this level from now on (at start-up, and when a reload changes log_level)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # The HTTP/2 and HPACK libraries log every frame and header at debug level.
    for chatty in ("hpack", "h2"):
        logging.getLogger(chatty).setLevel(max(logging.INFO, root.level))


class LineSink:
    """Where a logger's INFO lines go when it writes thousands a second (the access log).

    The caller builds each line as the configured formatter would: `before_time`, the
    time as `clock.at_milli` renders it, `after_time`, then its message (in JSON: the
    message as a JSON string, its fields, and the closing brace), and queues it with its
    line feed. That skips the LogRecord, the caller lookup, the handler's lock and the
    formatter (~15 us of ~20); tests hold such lines to the formatter's. The caller
    checks the level, as logger.info would, and writes printable text.
    """

    def __init__(
        self, logger: str, handler: BatchingHandler, formatter: JsonFormatter | TextFormatter
    ) -> None:
        layout = formatter.info_layout(logger)
        assert layout is not None  # (line_sink checks)
        self.before_time, self.after_time = layout
        self.structured = isinstance(formatter, JsonFormatter)
        self.clock = formatter.clock
        self.queue = handler.queue


def line_sink(logger: logging.Logger) -> LineSink | None:
    """A LineSink for `logger`, or None when its records may go anywhere else than the
    one handler configure() set (a handler or filter of its own, tests capturing logs)
    or in a format of its own: then log the usual way."""
    chain: logging.Logger | None = logger
    while chain is not None:
        if chain.filters or not chain.propagate or (chain.handlers and chain.parent is not None):
            return None
        chain = chain.parent
    handlers = logging.getLogger().handlers
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if not isinstance(handler, BatchingHandler) or handler.filters or handler.level > logging.INFO:
        return None
    formatter = handler.formatter
    if not isinstance(formatter, (TextFormatter, JsonFormatter)):
        return None
    if formatter.info_layout(logger.name) is None:
        return None  # a text format of its own
    return LineSink(logger.name, handler, formatter)
