"""Rate-limited log lines: a burst per key per period, the rest counted in one summary line;
and a denied caller's calls no longer write two lines each."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from collections.abc import Callable, Iterator

import grpc
import pytest
import uvloop

from sidecar.observe.loglimit import LogLimiter
from tests.conftest import Pki, SidecarFactory
from tests.probe import Probe

SUMMARY = re.compile(r'^(\d+) more like "(.*)" suppressed in the last (\S+)s$')


class Lines(logging.Handler):
    """The messages a logger wrote, and a hook called with each."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.on_message: Callable[[str], None] = lambda _: None

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.on_message(record.getMessage())

    @property
    def summaries(self) -> list[tuple[int, str]]:
        return [
            (int(m.group(1)), m.group(2)) for line in self.messages if (m := SUMMARY.match(line))
        ]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("loglimit-test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield handler
    logger.removeHandler(handler)


def test_a_burst_passes_then_the_rest_are_counted_in_one_summary(lines: Lines) -> None:
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("loglimit-test"), burst=5, period=10, clock=clock)
    for index in range(12):
        limiter.log(logging.WARNING, "caller-a", "denied: call %d", index)
    assert lines.messages == [f"denied: call {index}" for index in range(5)]
    clock.now += 10.5  # the period ends; with no loop running, the next line brings the summary
    limiter.log(logging.WARNING, "caller-b", "denied: other")
    assert lines.messages[5:] == [
        '7 more like "denied: call 5" suppressed in the last 10s',
        "denied: other",
    ]
    limiter.log(logging.WARNING, "caller-a", "denied: call %d", 12)  # a new period, a new burst
    assert lines.messages[-1] == "denied: call 12"


def test_each_key_has_its_own_budget(lines: Lines) -> None:
    limiter = LogLimiter(logging.getLogger("loglimit-test"), burst=2, clock=Clock())
    for index in range(4):
        for key in ("a", "b"):
            limiter.log(logging.WARNING, key, "%s %d", key, index)
    assert lines.messages == ["a 0", "b 0", "a 1", "b 1"]


def test_keys_beyond_max_keys_share_one_budget_and_the_limiter_stays_small(lines: Lines) -> None:
    clock = Clock()
    limiter = LogLimiter(
        logging.getLogger("loglimit-test"), burst=5, period=10, max_keys=4, clock=clock
    )
    for index in range(10_000):  # a caller inventing a key per line
        limiter.log(logging.WARNING, f"caller-{index}", "line %d", index)
    assert len(lines.messages) == 4 + 5  # the first four keys' lines, then the shared burst
    assert len(limiter._windows) <= 4 + 1
    limiter.flush()
    assert lines.summaries == [(10_000 - 9, "line 9")]


def test_every_suppressed_line_is_counted_in_a_summary(lines: Lines) -> None:
    clock = Clock()
    limiter = LogLimiter(
        logging.getLogger("loglimit-test"), burst=3, period=1, max_keys=5, clock=clock
    )
    total = 0
    for step in range(2000):
        clock.now += 0.013
        limiter.log(logging.WARNING, step % 7, "line %d", step)
        total += 1
    limiter.flush()
    written = [line for line in lines.messages if not SUMMARY.match(line)]
    assert len(written) < total / 4  # 26 periods, 5 budgets of 3 lines each
    assert len(written) + sum(count for count, _ in lines.summaries) == total


def test_a_level_the_logger_drops_is_not_counted(lines: Lines) -> None:
    limiter = LogLimiter(logging.getLogger("loglimit-test"), burst=1)
    for _ in range(3):
        limiter.log(logging.DEBUG, "a", "debug")
    limiter.flush()
    assert lines.messages == []


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_the_summary_is_written_by_a_timer_on_the_running_loop(
    lines: Lines, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    limiter = LogLimiter(logging.getLogger("loglimit-test"), burst=2, period=0.05)

    async def main() -> None:
        summary_written = asyncio.get_running_loop().create_future()
        lines.on_message = lambda line: (
            summary_written.done() or not SUMMARY.match(line) or summary_written.set_result(line)
        )
        for index in range(10):
            limiter.log(logging.WARNING, "a", "line %d", index)
        # Nothing else is logged: only the limiter's own timer can write the summary.
        await asyncio.wait_for(summary_written, timeout=5)

    loop = loop_factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert lines.summaries == [(8, "line 2")]


@pytest.mark.parametrize("plane", ["splice", "grpc"])
def test_a_denied_caller_writes_a_burst_of_lines_then_a_count(
    sidecars: SidecarFactory, probe: Probe, pki: Pki, plane: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", plane)
    denied = 0
    for _ in range(6):  # a few connections, as a client retrying would open
        with sidecar.channel(pki, "mallory") as channel:
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as error:
                    channel.unary_unary("/probe.Probe/Unary")(b"x", timeout=5)
                denied += error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied == 30
    with sidecar.channel(pki, "alice") as channel:
        channel.unary_unary("/probe.Probe/Unary")(b"x", timeout=5)
    sidecar.wait_for(r"peer='CN=alice' .* code=OK")  # every line before it is out
    denial_lines = [line for line in sidecar.lines if "denied: peer CN=mallory" in line]
    access_lines = [line for line in sidecar.lines if "peer='CN=mallory'" in line]
    assert len(denial_lines) == 5, "\n".join(sidecar.lines)
    assert len(access_lines) == 5, "\n".join(sidecar.lines)
    # The rest are owed as summaries: written when the period ends, or at the latest at exit.
    sidecar.signal(signal.SIGTERM)
    assert sidecar.wait_exit() == 0
    assert any(
        re.search(r'25 more like "denied: peer CN=mallory is not allowed .*" suppressed', line)
        for line in sidecar.lines
    ), "\n".join(sidecar.lines)
    assert any(
        re.search(r"25 more like \"/probe.Probe/Unary peer='CN=mallory' .*\" suppressed", line)
        for line in sidecar.lines
    ), "\n".join(sidecar.lines)
