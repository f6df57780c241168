"""Allowed callers that attack: each test is an attack on the spliced data plane, with a
well-behaved caller measuring service alongside, asserting that the attacker's
connection (and only it) pays, the sidecar stays responsive and bounded, and the app
never sees what it should not.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import statistics
import threading
import time
from concurrent import futures

import grpc
import hpack
import pytest

from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.hostile.peers import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    METHOD,
    PING,
    RST_STREAM,
    Footprint,
    RawPeer,
    frame,
    message,
    ping_round_trip,
    request_block,
    unary_ok,
)
from tests.probe import Probe

ENHANCE_YOUR_CALM, PROTOCOL_ERROR, NO_ERROR = 0xB, 0x1, 0x0


def budget_lines(sidecar: SidecarProcess) -> list[str]:
    return [line for line in sidecar.lines if "exceeded a budget" in line]


def measure_while(
    sidecar: SidecarProcess, pki: Pki, attacking: threading.Event, rounds: int = 5
) -> list[float]:
    """The sidecar's own PING round trip, `rounds` times while the attack is on."""
    assert attacking.wait(10), "the attack did not start"
    return [ping_round_trip(sidecar.port, pki) for _ in range(rounds)]


def test_a_ping_flood_without_reading_is_cut_once_and_costs_little(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    footprint = Footprint(sidecar.proc.pid)
    before = footprint.rss_mib
    with RawPeer(sidecar.port, pki) as attacker:
        attacker.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        pings = frame(PING, 0, 0, b"flooding") * 1000
        with contextlib.suppress(OSError):  # the sidecar resets the connection (or not yet)
            for _ in range(2000):  # 2M PINGs at most (~500k made 19 MB of answers before)
                attacker.send(pings)
    # Cut by whichever budget it runs out of first: its answers left unread, or control frames.
    sidecar.wait_for(
        "exceeded a budget: (requests or PINGs sent without reading the answers"
        "|more than 1000 control frames per second)"
    )
    assert unary_ok(sidecar, pki)
    grown = footprint.rss_mib - before
    assert grown < 20, f"RSS grew {grown:.1f} MiB"
    assert len(budget_lines(sidecar)) == 1, budget_lines(sidecar)  # one line, not one per PING


def test_a_control_frame_flood_is_told_enhance_your_calm(sidecar: SidecarProcess, pki: Pki) -> None:
    with RawPeer(sidecar.port, pki) as attacker:
        attacker.settle()
        priorities = frame(0x2, 0, 1, bytes(5)) * 2000  # PRIORITY
        with contextlib.suppress(OSError):  # the reset may come after the last write
            for _ in range(2000):
                attacker.send(priorities)
        goaway = attacker.goaway()
    assert goaway is not None and goaway[1] == ENHANCE_YOUR_CALM, goaway
    assert b"control frames" in goaway[2]
    assert unary_ok(sidecar, pki)


def test_a_flood_within_the_budget_does_not_stall_other_callers(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """With the control budget lifted, what protects the others is the work budget per pass:
    the flooding connection yields after a bounded number of frames."""
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--control-frame-rate", "100000000"
    )
    quiet = [ping_round_trip(sidecar.port, pki) for _ in range(5)]
    attacking, stop = threading.Event(), threading.Event()

    def flood() -> None:
        with RawPeer(sidecar.port, pki) as attacker:
            attacker.settle()
            priorities = frame(0x2, 0, 1, bytes(5)) * 4000
            attacking.set()
            while not stop.is_set():
                attacker.send(priorities)

    with futures.ThreadPoolExecutor(1) as pool:
        flooding = pool.submit(flood)
        try:
            during = measure_while(sidecar, pki, attacking)
        finally:
            stop.set()
        flooding.result(30)
    print(f"PING round trip: quiet {quiet}, during the flood {during}")
    assert statistics.median(during) < 0.25, during  # it was 551 ms before (p50)
    assert unary_ok(sidecar, pki)


def test_rapid_reset_is_cut_and_the_app_sees_a_bounded_number_of_calls(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--reset-rate", "10")
    with RawPeer(sidecar.port, pki) as attacker:
        attacker.settle()
        block = request_block()
        pairs = b"".join(
            frame(HEADERS, END_HEADERS, stream_id, block)
            + frame(RST_STREAM, 0, stream_id, (0x8).to_bytes(4, "big"))
            for stream_id in range(1, 20_001, 2)
        )
        with contextlib.suppress(OSError):
            attacker.send(pairs)  # 10,000 calls opened and cancelled at once
        goaway = attacker.goaway()
    assert goaway is not None and goaway[1] == ENHANCE_YOUR_CALM, goaway
    assert b"rapid reset" in goaway[2]
    # The burst is ten times the rate: 100, and a pass's worth of frames may be on its way.
    assert len(probe.calls) <= 200, f"the app saw {len(probe.calls)} calls"
    assert unary_ok(sidecar, pki)


def test_oversized_and_overcrowded_requests_are_answered_here_and_never_reach_the_app(
    sidecar: SidecarProcess, probe: Probe, pki: Pki
) -> None:
    with RawPeer(sidecar.port, pki) as caller:
        caller.settle()
        big = request_block(extra=(("x-big", "v" * 20_000),))
        caller.send_frame(HEADERS, END_HEADERS, 1, big)
        caller.send_frame(DATA, END_STREAM, 1, message(b"hello"))
        status = caller.status(1)
        assert status["grpc-status"] == "8", status  # RESOURCE_EXHAUSTED
        assert "larger than 16384 bytes" in status["grpc-message"]
        crowded = request_block(extra=tuple((f"x-{index}", "v") for index in range(300)))
        caller.send_frame(HEADERS, END_HEADERS | END_STREAM, 3, crowded)
        status = caller.status(3)
        assert status["grpc-status"] == "8", status
        assert "more than 256 header fields" in status["grpc-message"]
        caller.call(5)  # the connection goes on
        assert caller.status(5)["grpc-status"] == "0"
    assert len(probe.calls) == 1  # only the last


def test_a_header_block_of_tiny_fields_is_answered_unread(
    sidecar: SidecarProcess, probe: Probe, pki: Pki
) -> None:
    """250 KB of 1-byte fields cost 34.5 ms of CPU and stalled the loop for seconds: now a
    request block over twice max_header_list_size is answered RESOURCE_EXHAUSTED without
    being read (the connection goes on), and one over 256 KiB ends the connection."""
    tiny = request_block() + b"\x82" * 250_000  # ':method GET', again and again
    fragments = [tiny[offset : offset + 16_384] for offset in range(0, len(tiny), 16_384)]
    with RawPeer(sidecar.port, pki) as caller:
        caller.settle()
        caller.send(
            frame(HEADERS, 0, 1, fragments[0])
            + b"".join(frame(CONTINUATION, 0, 1, fragment) for fragment in fragments[1:-1])
            + frame(CONTINUATION, END_HEADERS | END_STREAM, 1, fragments[-1])
        )
        status = caller.status(1)
        assert status["grpc-status"] == "8", status
        caller.call(3)
        assert caller.status(3)["grpc-status"] == "0"
        huge = request_block() + b"\x82" * 300_000
        with contextlib.suppress(OSError):
            caller.send(frame(HEADERS, END_HEADERS, 5, huge))
        goaway = caller.goaway()
    assert goaway is not None and goaway[1] == PROTOCOL_ERROR, goaway
    assert b"bytes long" in goaway[2]
    assert len(probe.calls) == 1
    assert unary_ok(sidecar, pki)


def test_hpack_amplification_is_bounded_for_a_caller_that_never_empties_its_table(
    sidecar: SidecarProcess, probe: Probe, pki: Pki
) -> None:
    """It turned 107 KB into 54 MB to the app: a client that keeps its HPACK table sends a
    big field once and then refers to it with one byte per request."""
    encoder = hpack.Encoder()  # a table of 4096 bytes, never emptied
    with RawPeer(sidecar.port, pki) as attacker:  # never acknowledges our SETTINGS
        sent = 0
        stream_id = 1
        try:
            for _ in range(2000):
                block = request_block(extra=(("x-big", "v" * 3000),), encoder=encoder)
                data = frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block)
                attacker.send(data)
                sent += len(data)
                stream_id += 2
        except OSError:
            pass
        goaway = attacker.goaway()
    # The GOAWAY says why, unless a frame to the caller was half sent when it was cut (it
    # reads nothing: the app's answers fill its window), which the log still says.
    if goaway is not None:
        assert b"before the client applied a header table size of 0" in goaway[2], goaway
    sidecar.wait_for("broke HTTP/2: .*before the client applied a header table size of 0")
    delivered = sum(len(call.metadata) for call in probe.calls)
    # 64 x max_header_list_size of decoded headers at most: about 340 requests of 3 KB.
    assert len(probe.calls) <= 400, f"the app saw {len(probe.calls)} requests ({delivered})"


def test_the_apps_own_header_list_limit_is_honoured(sidecars: SidecarFactory, pki: Pki) -> None:
    app = Probe()
    port = app.start(
        options=(("grpc.max_metadata_size", 4096), ("grpc.absolute_max_metadata_size", 4096))
    )
    try:
        sidecar = sidecars.serving(port, "--allow-cn", "alice")
        with sidecar.channel(pki) as channel:
            call = channel.unary_unary(METHOD)
            with pytest.raises(grpc.RpcError) as refused:
                call(b"x", metadata=(("x-big", "v" * 6000),), timeout=5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than 4096 bytes" in (refused.value.details() or "")
            assert call(b"x", metadata=(("x-small", "v"),), timeout=5) == b"x"
        assert len(app.calls) == 1
    finally:
        app.stop()


MALFORMED = [
    pytest.param(("X-Upper", "1"), "'X-Upper' has uppercase", id="uppercase"),
    pytest.param((":x-user", "root"), "pseudo-header ':x-user'", id="unknown-pseudo"),
    pytest.param(("x-k", "a\r\nx-forged: 1"), "holds NUL, CR or LF", id="crlf"),
    pytest.param(("te", "gzip"), "only 'trailers'", id="te"),
]


@pytest.mark.parametrize(("field", "reason"), MALFORMED)
def test_malformed_requests_are_refused_internal_and_never_reach_the_app(
    sidecar: SidecarProcess, probe: Probe, pki: Pki, field: tuple[str, str], reason: str
) -> None:
    """RFC 9113 8.2: grpcio handed `:x-user` to the app as metadata."""
    name, value = field
    literal = b"\x00" + bytes((len(name),)) + name.encode() + bytes((len(value),)) + value.encode()
    with RawPeer(sidecar.port, pki) as caller:
        caller.settle()
        caller.send_frame(HEADERS, END_HEADERS, 1, request_block() + literal)
        caller.send_frame(DATA, END_STREAM, 1, message(b"x"))
        status = caller.status(1)
        assert status["grpc-status"] == "13", status
        assert reason in status["grpc-message"], status
        caller.call(3)
        assert caller.status(3)["grpc-status"] == "0"
    assert [call.method for call in probe.calls] == ["Unary"]  # only the good one
    assert not any(key.startswith(":") for key, _ in probe.calls[0].metadata)


def test_idle_connections_are_closed_with_a_goaway_and_busy_ones_kept(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--idle-timeout", "1")
    gate = probe.gate("held")
    with RawPeer(sidecar.port, pki) as idle, RawPeer(sidecar.port, pki) as busy:
        idle.settle()
        busy.settle()
        # A call in flight is not idleness: this stream outlives the idle timeout.
        block = request_block(extra=(("x-probe-gate", "held"),))
        busy.send_frame(HEADERS, END_HEADERS, 1, block)
        busy.send_frame(DATA, END_STREAM, 1, message(b"x"))
        probe.wait_for_calls(1)
        idle.call(1)
        assert idle.status(1)["grpc-status"] == "0"
        started = time.monotonic()
        goaway = idle.goaway()
        assert goaway == (1, NO_ERROR, b""), goaway
        assert 0.5 < time.monotonic() - started < 5
        assert idle.closed_within(5)
        assert not busy.closed_within(1)  # the read stops at the timeout, not at a close
        gate.set()
        assert busy.status(1)["grpc-status"] == "0"
        assert busy.goaway() is not None  # then idle: closed


def test_an_idle_close_is_not_logged_as_the_app_dropping_the_connection(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """Closing an idle caller, the splice closes the app's connection itself: that is not the
    app dropping it (a WARNING, "closed a connection abruptly"), and the caller's close, under
    way, is not aborted by it."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--idle-timeout", "1")
    with RawPeer(sidecar.port, pki) as caller:
        caller.settle()
        caller.call(1)
        assert caller.status(1)["grpc-status"] == "0"
        assert caller.goaway() == (1, NO_ERROR, b"")
        assert caller.closed_within(5)
    sidecar.signal(signal.SIGTERM)
    assert sidecar.wait_exit() == 0  # every line it wrote has been read
    assert not [line for line in sidecar.lines if "abruptly" in line], sidecar.output


def test_a_drain_grace_ending_is_not_logged_as_the_app_dropping_the_connection(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """A caller that does not answer the drain's PING is still waited for when a short drain
    grace ends: the splice then aborts both connections itself, which is not the app
    dropping one."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--drain-grace", "0.2")
    with RawPeer(sidecar.port, pki) as caller:
        caller.settle()
        caller.call(1)
        assert caller.status(1)["grpc-status"] == "0"
        sidecar.signal(signal.SIGTERM)
        assert caller.goaway() is not None  # the drain's first GOAWAY; its PING goes unanswered
        assert sidecar.wait_exit() == 0  # every line it wrote has been read
    assert not [line for line in sidecar.lines if "abruptly" in line], sidecar.output


def test_an_unfinished_header_block_is_dropped_after_the_header_timeout(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--header-timeout", "1")
    footprint = Footprint(sidecar.proc.pid)
    before = footprint.rss_mib
    peers = [RawPeer(sidecar.port, pki) for _ in range(50)]
    try:
        for peer in peers:
            peer.settle()
            block = request_block() + b"\x82" * 30_000  # just under the block cap
            peer.send(frame(HEADERS, 0, 1, block[:16_000]))  # no END_HEADERS: unfinished
        held = footprint.rss_mib - before
        started = time.monotonic()
        for peer in peers:
            goaway = peer.goaway()
            assert goaway is not None and goaway[1] == PROTOCOL_ERROR, goaway
        assert time.monotonic() - started < 5
    finally:
        for peer in peers:
            peer.close()
    print(f"50 connections holding a 16 KB unfinished block: +{held:.1f} MiB")
    assert held < 30
    assert unary_ok(sidecar, pki)


def test_the_grpc_plane_honours_the_budgets_grpc_core_has(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """max_header_list_size and idle_timeout reach grpc core's server (whose channel
    arguments are never checked: a misspelt one would be ignored silently)."""
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--data-plane", "grpc",
        "--max-header-list-size", "4096", "--idle-timeout", "1",
    )  # fmt: skip
    with sidecar.channel(pki) as channel:
        call = channel.unary_unary(METHOD)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"x", metadata=(("x-big", "v" * 6000),), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(b"x", timeout=5) == b"x"
    with RawPeer(sidecar.port, pki) as idle:
        idle.settle()
        started = time.monotonic()
        goaway = idle.goaway()
        assert goaway is not None, "no GOAWAY for an idle connection"
        assert time.monotonic() - started < 5
    assert len(probe.calls) == 1
