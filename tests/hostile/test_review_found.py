"""What an adversarial review of the budgets found, each kept as the behaviour it broke:
a legit caller cut by a budget, a budget that could be sidestepped, an error that escaped."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import grpc
import pytest

from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.hostile.peers import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    METHOD,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    RawPeer,
    client_context,
    eventually,
    frame,
    message,
    request_block,
    unary_ok,
)
from tests.probe import Probe

ENHANCE_YOUR_CALM = 0xB
SERVER_STREAM = "/probe.Probe/ServerStream"
BIDI = "/probe.Probe/Bidi"


def test_a_call_with_too_much_metadata_fails_alone(sidecar: SidecarProcess, pki: Pki) -> None:
    """40 KiB of metadata ended the whole connection (GOAWAY PROTOCOL_ERROR), taking an
    unrelated stream with it; straight to the app only that call fails."""
    with sidecar.channel(pki) as channel:
        stream = channel.unary_stream(SERVER_STREAM)(
            b"s", metadata=(("x-probe-count", "2"), ("x-probe-gate", "later")), timeout=10
        )
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(METHOD)(b"x", metadata=(("x-big", "v" * 40_000),), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert channel.unary_unary(METHOD)(b"after", timeout=5) == b"after"
        del stream  # cancelled when the channel closes: it was not cut before


def test_steady_traffic_split_across_reads_is_not_cut_by_the_header_timeout(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """Each write finished one call and began the next one's HEADERS: some frame was always
    unfinished at the end of a read, and the timer, never restarted, cut the caller."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--header-timeout", "1")
    with RawPeer(sidecar.port, pki) as caller:
        caller.settle()
        block = request_block()
        pending = b""
        stream_id = 1
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            call = frame(HEADERS, END_HEADERS, stream_id, block)
            call += frame(DATA, END_STREAM, stream_id, message(b"x"))
            caller.send(pending + call[:20])  # the rest of the last, the start of this one
            pending = call[20:]
            assert caller.status(stream_id - 2)["grpc-status"] == "0" if stream_id > 1 else True
            stream_id += 2
            time.sleep(0.05)  # a slow link: frames arrive in pieces (not synchronisation)
        caller.send(pending)
        assert caller.status(stream_id - 2)["grpc-status"] == "0"


def test_ping_acks_nothing_asked_for_are_control_frames(sidecar: SidecarProcess, pki: Pki) -> None:
    """The sidecar never pings a caller, so a caller's PING ACKs answer nothing: they were
    not counted, and 640k a second ran for ever."""
    with RawPeer(sidecar.port, pki) as attacker:
        attacker.settle()
        acks = frame(PING, ACK, 0, b"whatever") * 2000
        with contextlib.suppress(OSError):  # the reset may come after the last write
            for _ in range(2000):
                attacker.send(acks)
        goaway = attacker.goaway()
    assert goaway is not None and goaway[1] == ENHANCE_YOUR_CALM, goaway


def test_a_settings_ack_of_nothing_is_left_out(sidecar: SidecarProcess, pki: Pki) -> None:
    """Relayed, it made the app drop the connection, and the log blamed the app."""
    with RawPeer(sidecar.port, pki) as caller:
        caller.settle()
        caller.send_frame(SETTINGS, ACK, 0)  # one more than the app's SETTINGS
        caller.call(1)
        assert caller.status(1)["grpc-status"] == "0"
        caller.call(3)
        assert caller.status(3)["grpc-status"] == "0"
    assert not any("closed a connection abruptly" in line for line in sidecar.lines)


def test_blocks_on_streams_that_are_over_never_reach_the_app(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """50k HEADERS on a finished stream were scanned and all relayed to the app."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice")
    with RawPeer(sidecar.port, pki) as attacker:
        attacker.settle()
        attacker.call(1)
        assert attacker.status(1)["grpc-status"] == "0"
        trailers = frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x40\x01x\x01y") * 2000
        with contextlib.suppress(OSError):  # the reset may come after the last write
            for _ in range(2000):
                attacker.send(trailers)
        goaway = attacker.goaway()
    assert goaway is not None and goaway[1] == ENHANCE_YOUR_CALM, goaway
    assert len(probe.calls) == 1


def test_resets_after_the_first_response_bytes_spend_the_reset_budget(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """Only calls without response headers were charged: an app that answers headers first
    ran a handler for every opened-and-reset call, without limit."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--reset-rate", "10")
    goaway = None
    with RawPeer(sidecar.port, pki) as attacker:
        attacker.settle()
        for stream_id in range(1, 2001, 2):
            # Each call held by its own gate, which only its cancellation opens.
            gate = ("x-probe-gate", f"held-{stream_id}")
            block = request_block(extra=(("x-probe-headers", "1"), gate))
            with contextlib.suppress(OSError):
                attacker.send_frame(HEADERS, END_HEADERS, stream_id, block)
                attacker.send_frame(DATA, END_STREAM, stream_id, message(b"x"))
            while (read := attacker.read_frame()) is not None:  # until the app's headers
                kind, _, got_stream, payload = read
                if kind == GOAWAY:
                    goaway = int.from_bytes(payload[4:8], "big")
                    break
                if kind == HEADERS and got_stream == stream_id:
                    break
            if read is None or goaway is not None:
                break
            with contextlib.suppress(OSError):
                attacker.send_frame(RST_STREAM, 0, stream_id, (0x8).to_bytes(4, "big"))
    assert goaway == ENHANCE_YOUR_CALM, goaway
    assert len(probe.calls) <= 150  # a burst of 100, and the rate while it ran


def test_refused_requests_spend_control_frames_not_the_reset_budget(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """Charged as resets, a client with a recurring metadata defect had its connection cut,
    and its other calls with it, past 100 refusals a second."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--reset-rate", "10")
    with RawPeer(sidecar.port, pki) as caller:
        caller.settle()
        bad = request_block(extra=(("x-k", "a\r\nb"),))
        for stream_id in range(1, 1001, 2):  # 500 refused, five times the reset burst
            caller.send_frame(HEADERS, END_HEADERS | END_STREAM, stream_id, bad)
        for stream_id in range(1, 1001, 2):
            assert caller.status(stream_id)["grpc-status"] == "13"
        caller.call(1001)
        assert caller.status(1001)["grpc-status"] == "0"


def test_a_denied_callers_call_and_goaway_in_one_write_raise_nothing(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    """h2 had closed the connection before the call was answered: a traceback per connection,
    no rate limit."""
    goaway = frame(GOAWAY, 0, 0, bytes(8))
    for _ in range(3):
        with RawPeer(sidecar.port, pki, "mallory") as caller:
            caller.settle()
            caller.send(
                frame(HEADERS, END_HEADERS, 1, request_block())
                + frame(DATA, 0, 1, message(b"hi"))
                + goaway
            )
            assert caller.closed_within(5)
    assert unary_ok(sidecar, pki)
    assert not [line for line in sidecar.lines if "Traceback" in line or "Fatal" in line]


def test_evicting_handshakes_never_leaves_the_listener_refusing_everyone(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """A handshake done but not yet resumed was still "pending": evicted, its place beyond
    max_connections was given back twice, and the listener refused every caller for good."""
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--max-connections", "1", "--max-pending-handshakes", "1"
    )
    context = client_context(pki, "alice")
    holder = RawPeer(sidecar.port, pki)
    holder.settle()

    def storm() -> None:
        for _ in range(40):
            with contextlib.suppress(OSError):
                raw = socket.create_connection(("127.0.0.1", sidecar.port), timeout=3)
                context.wrap_socket(raw, server_hostname="localhost").close()

    threads = [threading.Thread(target=storm) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    holder.close()
    # The holder's close takes a moment to reach the sidecar.
    served = eventually(lambda: unary_ok(sidecar, pki, timeout=2), 10)
    assert served, "refused at max_connections with nobody connected"


def test_requests_answered_here_while_the_caller_does_not_read_are_bounded(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    """A caller that stops reading a big stream holds the sidecar mid-frame towards it; the
    requests the sidecar answers itself (malformed ones) were answered into a list, within
    the control budget and without end: 20 such callers grew the sidecar 100 MiB in 30 s.
    Past 1000 answers left unread, the caller is cut."""
    malformed = request_block(METHOD) + b"\x00\x03X-K\x01v"  # a name with uppercase
    with RawPeer(sidecar.port, pki) as attacker:
        attacker.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        attacker.settle()
        # Windows wide open: the app's stream fills the sidecar's buffer towards the caller.
        wide = (2**31 - 1).to_bytes(4, "big")
        attacker.send_frame(SETTINGS, 0, 0, (0x4).to_bytes(2, "big") + wide)
        attacker.send_frame(WINDOW_UPDATE, 0, 0, (2**31 - 1 - 65_535).to_bytes(4, "big"))
        big = request_block(SERVER_STREAM, (("x-probe-count", "100000"),))
        attacker.send_frame(HEADERS, END_HEADERS, 1, big)
        attacker.send_frame(DATA, END_STREAM, 1, message(b"r" * 16_000))
        stream_id, start = 3, time.monotonic()
        with contextlib.suppress(OSError):  # cut: the sidecar's reset ends the writes
            while stream_id < 2 * 20_000 and "exceeded a budget" not in sidecar.output:
                # 900 a second: within the control-frame budget (1000 a second)
                while stream_id > 3 + 2 * 900 * (time.monotonic() - start):
                    time.sleep(0.01)  # pacing the attack, not waiting for the sidecar
                attacker.send_frame(HEADERS, END_HEADERS | END_STREAM, stream_id, malformed)
                stream_id += 2
    sidecar.wait_for("exceeded a budget: requests or PINGs sent without reading the answers")
    assert unary_ok(sidecar, pki)


def test_malformed_trailers_cancel_calls_at_the_price_of_a_reset(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """Trailers holding a pseudo-header make the sidecar answer the call and reset it at the
    app: a rapid reset by other means, which cost one control frame, not one reset (8,000
    such calls ran 4,500-6,900 handlers in the app, with no GOAWAY)."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--reset-rate", "10")
    late_path = b"\x04\x02/x"  # :path (static name 4), a literal: a pseudo-header in trailers
    with RawPeer(sidecar.port, pki) as caller:
        caller.settle()
        with contextlib.suppress(OSError):  # the sidecar's reset may end the writes
            for stream_id in range(1, 2 * 300, 2):
                caller.send(
                    frame(HEADERS, END_HEADERS, stream_id, request_block(BIDI))
                    + frame(HEADERS, END_HEADERS | END_STREAM, stream_id, late_path)
                )
        goaway = caller.goaway()
    assert goaway is not None and goaway[1] == ENHANCE_YOUR_CALM, goaway
    assert b"rapid reset" in goaway[2]


def test_resets_of_streams_that_are_no_call_do_not_keep_a_connection_from_idling(
    sidecars: SidecarFactory, probe: Probe, pki: Pki
) -> None:
    """An RST_STREAM on a stream never opened restarted the idle clock: one 13-byte frame per
    idle_timeout held a connection (and the app's) open for ever."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--idle-timeout", "1")
    with RawPeer(sidecar.port, pki) as caller:
        caller.settle()
        closed, stream_id = False, 101
        for _ in range(15):  # 0.4 s apart: 6 s at most, the idle timeout being 1 s
            caller.send_frame(RST_STREAM, 0, stream_id, bytes(4))
            stream_id += 2
            if caller.closed_within(0.4):
                closed = True
                break
    assert closed, "the connection outlived its idle timeout"
