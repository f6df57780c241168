"""Logging: the batching handler (lines written together a moment later, a broken stream survived),
escaping caller text, and each record on one line in both formats."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest

from sidecar.observe import calls, logs
from sidecar.observe.accesslog import access_log, log_usually
from sidecar.observe.calls import Batched, CallRecord
from sidecar.observe.logs import BatchingHandler, JsonFormatter, TextFormatter, escape
from tests.conftest import log_configured


async def after_the_flush() -> None:
    """Resume once the handler's delayed write has run: a timer of the event loop's that
    falls due later than the handler's (timers run in the order of their times)."""
    await asyncio.sleep(logs._FLUSH_SECONDS * 2)


def _unread(reader: io.BufferedReader) -> bytes:
    """What the pipe holds now, without waiting."""
    os.set_blocking(reader.fileno(), False)
    return reader.read() or b""


def test_lines_logged_on_the_loop_are_written_together_in_order_a_moment_later() -> None:
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as reader, open(write_end, "w") as stream:
        handler = BatchingHandler(stream)
        logger = logging.Logger("batch-test")
        logger.addHandler(handler)
        before_the_flush: list[bytes] = []

        async def main() -> None:
            for index in range(3):
                logger.warning("line %d", index)
            await asyncio.sleep(0)  # a turn of the loop: nothing written yet
            before_the_flush.append(_unread(reader))
            await after_the_flush()

        asyncio.run(main())
        assert before_the_flush == [b""]
        assert _unread(reader) == b"line 0\nline 1\nline 2\n"


def test_many_lines_in_waiting_are_written_at_once() -> None:
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as reader, open(write_end, "w") as stream:
        handler = BatchingHandler(stream)
        logger = logging.Logger("batch-test")
        logger.addHandler(handler)
        written: list[bytes] = []

        async def main() -> None:
            for index in range(logs._FLUSH_LINES):
                logger.warning("%d", index)
            written.append(_unread(reader))  # before any timer could run
            await after_the_flush()

        asyncio.run(main())
        assert written[0].splitlines() == [
            str(index).encode() for index in range(logs._FLUSH_LINES)
        ]


def test_lines_logged_off_the_loop_are_written_at_once_after_those_waiting() -> None:
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as reader, open(write_end, "w") as stream:
        handler = BatchingHandler(stream)
        logger = logging.Logger("batch-test")
        logger.addHandler(handler)

        async def main() -> None:
            logger.warning("on the loop")

        asyncio.run(main())  # the loop ends before its write was due
        logger.warning("off the loop")
        assert _unread(reader) == b"on the loop\noff the loop\n"


def test_a_broken_stream_loses_the_lines_but_never_raises_into_the_loop() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    errors: list[dict[str, Any]] = []
    stream = open(write_end, "w")  # noqa: SIM115 (closed below, where EPIPE is expected)
    try:
        handler = BatchingHandler(stream)
        logger = logging.Logger("broken-test")
        logger.addHandler(handler)

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(
                lambda _, context: errors.append(context)
            )
            logger.warning("lost")
            for _ in range(3):  # a spin would fail the write again on each turn
                await after_the_flush()

        previous, logging.raiseExceptions = logging.raiseExceptions, False  # no report on stderr
        try:
            asyncio.run(main())
        finally:
            logging.raiseExceptions = previous
    finally:
        with contextlib.suppress(BrokenPipeError):  # the text buffer still holds the line
            stream.close()
    assert errors == [], "a failed write reached the event loop's exception handler"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("/kv.KV/Get", "/kv.KV/Get"),
        ("a b", "a b"),
        ("line\nforged", r"line\nforged"),
        ("\r\t", r"\r\t"),
        ("\x1b[2J\x0b\x0c\x7f", r"\x1b[2J\x0b\x0c\x7f"),
        ("\x85\u2028\u2029\u202e", r"\x85\u2028\u2029\u202e"),
        ("adm\u0131n \u212aube", r"adm\u0131n \u212aube"),  # look-alikes of i and K
        ("\U0001f600", r"\U0001f600"),
        ("back\\slash", r"back\\slash"),
    ],
    ids=ascii,
)
def test_escape_shows_what_is_not_printable_ascii_like_repr(text: str, shown: str) -> None:
    assert escape(text) == shown


def test_escape_never_shows_two_texts_alike() -> None:
    texts = ["\n", "\\n", "\\\n", "\x85", "\\x85", "\u0131", "\\u0131", "i", "I", "\u212a", "K"]
    assert len({escape(text) for text in texts}) == len(texts)


def _formatted(formatter: logging.Formatter, emit: Callable[[logging.Logger], None]) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.Logger("format-test")
    logger.addHandler(handler)
    emit(logger)
    return stream.getvalue()


def test_text_format_keeps_each_record_on_one_line() -> None:
    text = _formatted(
        TextFormatter("%(levelname)s %(message)s"),
        lambda logger: logger.info("caller broke HTTP/2: %s", "bad '\n' in\u2028\x1b[2J"),
    )
    assert text == "INFO caller broke HTTP/2: bad '\\n' in\\u2028\\x1b[2J\n"


def test_text_format_leaves_values_escaped_at_their_source_as_they_are() -> None:
    text = _formatted(
        TextFormatter("%(message)s"), lambda logger: logger.warning("denied: %s", escape("a\nb"))
    )
    assert text == "denied: a\\nb\n"


def test_text_format_still_writes_the_sidecars_own_traceback_below_the_line() -> None:
    def fail(logger: logging.Logger) -> None:
        try:
            raise RuntimeError("bug")
        except RuntimeError:
            logger.exception("internal error relaying %s", "/m\n")

    text = _formatted(TextFormatter("%(message)s"), fail)
    first, *rest = text.splitlines()
    assert first == "internal error relaying /m\\n"
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "RuntimeError: bug"


def test_json_format_is_ascii_so_no_reader_sees_a_line_break_inside_a_line() -> None:
    method = "/m\n\x85\u2028\u0131"
    text = _formatted(
        JsonFormatter(),
        lambda logger: logger.info("%s", method, extra={"fields": {"method": method}}),
    )
    assert len(text.splitlines()) == 1  # str.splitlines breaks at NEL and U+2028 too
    assert text.isascii()
    entry = json.loads(text)
    assert entry["method"] == method and entry["message"] == method


def test_json_time_is_rfc_3339_in_utc_with_milliseconds() -> None:
    entry = json.loads(_formatted(JsonFormatter(), lambda logger: logger.info("x")))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry
    parsed = datetime.datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs((now - parsed).total_seconds()) < 60


def _ended(method: str, peer: str, code: grpc.StatusCode, **fields: Any) -> CallRecord:
    now = time.monotonic()
    return CallRecord(method, now - 0.0123, "ipv4:127.0.0.1:5", peer, code, ended=now, **fields)


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_the_access_logs_quick_lines_read_as_the_formatter_writes_records(
    formatter: logging.Formatter,
) -> None:
    records = [
        _ended("/a.B/C", "CN=alice, DNS=a", grpc.StatusCode.OK, bytes_in=3, bytes_out=40),
        _ended("/a.B/C", "CN=alice, DNS=a", grpc.StatusCode.OK, route="in"),  # its heads kept
        _ended("/a b\n/\u2028'C", "CN=o'\u0430\\", grpc.StatusCode.UNAVAILABLE,
               route='r"1', details="app down: 'refused'\n\u00e9"),
    ]  # fmt: skip
    with log_configured(formatter) as stream:
        log = access_log()
        assert log is not None and log._lines is not None  # the quick lines, not logging's
        log.calls_ended(records)
        log.calls_ended(records)  # the kept heads this time
        for record in records:
            log_usually(record)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 9
    quick, usual = lines[:3], lines[6:]
    for quick_line, usual_line, again in zip(quick, usual, lines[3:6], strict=True):
        if isinstance(formatter, JsonFormatter):
            quick_entry, usual_entry = json.loads(quick_line), json.loads(usual_line)
            stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
            assert re.fullmatch(stamp, quick_entry.pop("time"))
            usual_entry.pop("time")
            assert quick_entry == usual_entry
            assert json.loads(again) | {"time": ""} == quick_entry | {"time": ""}
        else:
            stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
            assert re.match(stamp + "INFO sidecar.access: ", quick_line)
            assert re.sub(stamp, "", quick_line) == re.sub(stamp, "", usual_line)
            assert re.sub(stamp, "", again) == re.sub(stamp, "", quick_line)
    assert "duration_ms=12.3" in usual[0]


def test_a_logger_with_a_handler_of_its_own_gets_no_line_sink() -> None:
    handler = BatchingHandler(io.StringIO())
    handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    own = logging.getLogger("sidecar.access.test-own")
    own.addHandler(logging.NullHandler())
    try:
        assert logs.line_sink(logging.getLogger("sidecar.access")) is not None
        assert logs.line_sink(own) is None  # its records go elsewhere too
        handler.setFormatter(TextFormatter("%(message)s"))
        assert (
            logs.line_sink(logging.getLogger("sidecar.access")) is None
        )  # not the standard format
    finally:
        root.handlers[:] = saved
        own.handlers.clear()


def test_the_handler_counts_lines_not_queued_texts() -> None:
    """The access log queues a batch of lines as one text: 1000 lines in waiting are
    written at once however they were queued (a burst must not pile up until the timer)."""
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as reader, open(write_end, "w") as stream:
        handler = BatchingHandler(stream)
        written: list[bytes] = []

        async def main() -> None:
            handler.queue("a\n" * (logs._FLUSH_LINES - 1), logs._FLUSH_LINES - 1)
            written.append(_unread(reader))
            handler.queue("b\n")
            written.append(_unread(reader))  # before any timer could run
            await after_the_flush()

        asyncio.run(main())
        assert written[0] == b""
        assert written[1] == b"a\n" * (logs._FLUSH_LINES - 1) + b"b\n"


def test_an_observer_that_fails_costs_the_others_nothing_nor_the_data_plane() -> None:
    heard: list[int] = []

    class Failing:
        def calls_ended(self, records: Sequence[CallRecord]) -> None:
            raise RuntimeError("a bug")

    class Counting:
        def calls_ended(self, records: Sequence[CallRecord]) -> None:
            heard.append(len(records))

    batched = Batched([Failing(), Counting()])

    async def main() -> None:
        for _ in range(calls._HOLD_CALLS + 1):  # the 256th hands the batch over in call_ended
            batched.call_ended(_ended("/a.B/C", "CN=a", grpc.StatusCode.OK))
        batched.close()

    asyncio.run(main())
    assert heard == [calls._HOLD_CALLS, 1]


def test_after_close_each_call_is_handed_over_as_it_ends() -> None:
    heard: list[str] = []

    class Listening:
        def calls_ended(self, records: Sequence[CallRecord]) -> None:
            heard.extend(record.method for record in records)

    batched = Batched([Listening()])

    async def main() -> None:
        batched.call_ended(_ended("/a.B/One", "CN=a", grpc.StatusCode.OK))
        assert heard == []  # waits for the others of the next 10 ms
        batched.close()
        assert heard == ["/a.B/One"]
        batched.call_ended(_ended("/a.B/Two", "CN=a", grpc.StatusCode.OK))
        assert heard == ["/a.B/One", "/a.B/Two"]  # no timer: the process is ending

    asyncio.run(main())
