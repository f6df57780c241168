"""The batching log handler: lines written once per loop turn, and a broken stream survived."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from sidecar.logs import BatchingHandler


async def after_the_writes_scheduled() -> None:
    """Resume after the callbacks scheduled so far (the handler's write among them) ran."""
    loop = asyncio.get_running_loop()
    turn = loop.create_future()
    loop.call_soon(turn.set_result, None)
    await turn


def test_lines_of_one_loop_turn_are_written_together_in_order() -> None:
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as reader, open(write_end, "w") as stream:
        handler = BatchingHandler(stream)
        logger = logging.Logger("batch-test")
        logger.addHandler(handler)

        async def main() -> None:
            for index in range(3):
                logger.warning("line %d", index)
            await after_the_writes_scheduled()

        asyncio.run(main())
        stream.close()
        assert reader.read() == b"line 0\nline 1\nline 2\n"


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
                await after_the_writes_scheduled()

        previous, logging.raiseExceptions = logging.raiseExceptions, False  # no report on stderr
        try:
            asyncio.run(main())
        finally:
            logging.raiseExceptions = previous
    finally:
        with contextlib.suppress(BrokenPipeError):  # the text buffer still holds the line
            stream.close()
    assert errors == [], "a failed write reached the event loop's exception handler"
