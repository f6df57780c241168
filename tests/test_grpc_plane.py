"""The per-call data plane (`--data-plane grpc`) under a drain, expired deadlines, big calls
and a request grpc.aio cannot take."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from sidecar.h2.frames import END_HEADERS, END_STREAM, HEADERS
from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.h2_observer import H2Observer
from tests.hostile.peers import RawPeer, request_block
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"
BIDI = "/probe.Probe/Bidi"
GRPC_PLANE = ("--data-plane", "grpc")
MIB = 1024 * 1024


def access_codes(
    process: SidecarProcess, count: int, method: str = UNARY, timeout: float = 20
) -> list[str]:
    """The codes of the access-log lines for method, once there are count of them."""
    access = re.compile(rf"sidecar\.access: {re.escape(method)} .* code=(?P<code>[A-Z_]+) ")
    with process._changed:
        process._changed.wait_for(
            lambda: sum(bool(access.search(line)) for line in process.lines) >= count, timeout
        )
        return [m.group("code") for line in process.lines if (m := access.search(line))]


def held_requests(hold: threading.Event) -> Iterator[bytes]:
    """One message, then the request stream stays open: the client never half-closes."""
    yield b"x"
    hold.wait()


def test_sigterm_lets_every_call_in_flight_finish(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """32 calls sent just before SIGTERM: grpc core has accepted most of them but not yet
    handed them to the relay, and its shutdown cancels those; the drain must not."""
    process = sidecars.serving(probe.port, "--allow-cn", "alice", "--drain-grace", "5", *GRPC_PLANE)
    gate = probe.gate("slow")  # the app answers when the test says so
    with process.channel(pki) as channel:
        unary = channel.unary_unary(UNARY)
        assert unary(b"ready", timeout=10) == b"ready"  # the connection is up
        calls = [
            unary.future(b"call %d" % n, timeout=30, metadata=[("x-probe-gate", "slow")])
            for n in range(32)
        ]
        process.signal(signal.SIGTERM)
        process.wait_for("SIGTERM: draining")
        probe.wait_for_calls(33)  # every call reaches the app...
        assert process.proc.poll() is None, "the sidecar must wait for the calls in flight"
        gate.set()  # ...and is answered
        replies = [call.result() for call in calls]
    assert replies == [b"call %d" % n for n in range(32)]
    assert process.wait_exit() == 0
    assert access_codes(process, 33) == ["OK"] * 33


def test_expired_deadlines_are_logged_as_deadline_exceeded_without_errors(
    sidecars: SidecarFactory, pki: Pki
) -> None:
    """The app never answers: the client's deadline and the sidecar's copy of it upstream
    expire together, and the upstream's DEADLINE_EXCEEDED often comes back on a call
    that is already over."""
    sleeping_app = H2Observer()
    try:
        process = sidecars.serving(sleeping_app.port, "--allow-cn", "alice", *GRPC_PLANE)
        calls = 60
        hold = threading.Event()
        with process.channel(pki) as channel:
            bidi = channel.stream_stream(BIDI)  # like gRPC's interop timeout_on_sleeping_server
            for n in range(calls):
                call = bidi(held_requests(hold), timeout=(20 + n) / 1000)
                with pytest.raises(grpc.RpcError) as raised:
                    list(call)
                assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        codes = access_codes(process, calls, BIDI)
    finally:
        hold.set()
        sleeping_app.close()
    errors = [line for line in process.lines if " ERROR " in line or "Traceback" in line]
    assert not errors, "\n".join(errors)
    assert codes == ["DEADLINE_EXCEEDED"] * calls


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


def test_memory_of_a_large_call_goes_back_to_the_system(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """The plane holds a 64 MiB message whole several times over (README: about 5x at
    the peak); once the call is over, what glibc kept of that must be given back."""
    process = sidecars.serving(probe.port, "--allow-cn", "alice", *GRPC_PLANE)
    payload = bytes(range(256)) * (64 * MIB // 256)
    with process.channel(pki) as channel:
        unary = channel.unary_unary(UNARY)
        assert unary(b"warm", timeout=10) == b"warm"
        baseline = resident_mib(process.proc.pid)
        assert unary(payload, timeout=60) == payload
        # No event says when the heap was trimmed: watch RSS, with a bound.
        deadline = time.monotonic() + 10
        while (grown := resident_mib(process.proc.pid) - baseline) > 50:
            assert time.monotonic() < deadline, f"RSS stayed {grown:.0f} MiB above its baseline"
            threading.Event().wait(0.1)


def test_a_path_that_is_not_utf8_does_not_end_the_listener(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """grpc.aio's accept loop decodes every :path as UTF-8 before any handler runs, and one
    that is not ended its server: a caller not even allowed stopped the route for good.
    The plane serves again on a new server, and says so."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", "grpc")
    with RawPeer(sidecar.port, pki, "mallory") as peer:
        peer.settle()
        peer.send_frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            request_block(b"/probe.Probe/Unary\xff"),  # type: ignore[arg-type]
        )
        sidecar.wait_for("grpc.aio's server stopped on its own .*: serving on a new one")
    with sidecar.channel(pki, "alice") as alice:
        assert alice.unary_unary("/probe.Probe/Unary")(b"x", timeout=10) == b"x"
