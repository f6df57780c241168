"""Signals drain the sidecar; every call leaves one access-log line, in text or JSON."""

from __future__ import annotations

import json
import re
import signal
import socket
import time

import grpc
import pytest

from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"


def wait_until_refused(port: int, timeout: float = 10) -> None:
    """Connect until the listener refuses: the sidecar has stopped accepting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            continue  # the listener closed during this connect: the next one tells
    raise AssertionError(f"port {port} still accepts connections")


def test_sigterm_stops_accepting_and_lets_in_flight_calls_finish(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    process = sidecars.serving(probe.port, "--allow-cn", "alice", "--drain-grace", "30")
    gate = probe.gate("drain")
    with process.channel(pki) as channel:
        in_flight = channel.unary_unary(UNARY).future(
            b"finish me", timeout=60, metadata=[("x-probe-gate", "drain")]
        )
        probe.wait_for_calls(1)
        process.signal(signal.SIGTERM)
        process.wait_for("SIGTERM: draining")
        wait_until_refused(process.port)
        assert process.proc.poll() is None, "must wait for the in-flight call"
        gate.set()
        assert in_flight.result() == b"finish me"
    assert process.wait_exit() == 0


@pytest.mark.parametrize("plane", ["splice", "grpc"])
def test_drain_grace_bounds_how_long_in_flight_calls_may_run(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, plane: str
) -> None:
    process = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--drain-grace", "0.5", "--data-plane", plane
    )
    with process.channel(pki) as channel:
        assert channel.unary_unary(UNARY)(b"done", timeout=10) == b"done"
        stuck = channel.unary_unary(UNARY).future(
            b"x", timeout=60, metadata=[("x-probe-gate", "never")]
        )
        (_, seen) = probe.wait_for_calls(2)
        process.signal(signal.SIGINT)
        with pytest.raises(grpc.RpcError) as raised:
            stuck.result()
        assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert seen.woke.wait(10) and seen.cancelled, "the upstream call must be cancelled too"
    assert process.wait_exit() == 0
    # Both calls are logged before the process ends (lines wait in a batch), the one the
    # drain cut too: on the grpc plane its handler reports it after the route stopped.
    access = [line for line in process.output.splitlines() if "sidecar.access" in line]
    assert len(access) == 2, process.output
    assert re.search(r"code=(CANCELLED|UNAVAILABLE)", access[1]), access


def test_second_signal_exits_at_once(sidecars: SidecarFactory, pki: Pki, probe: Probe) -> None:
    process = sidecars.serving(probe.port, "--allow-cn", "alice", "--drain-grace", "600")
    with process.channel(pki) as channel:
        held = channel.unary_unary(UNARY).future(
            b"x", timeout=60, metadata=[("x-probe-gate", "never")]
        )
        probe.wait_for_calls(1)
        process.signal(signal.SIGTERM)
        process.wait_for("SIGTERM: draining")
        process.signal(signal.SIGTERM)
        assert process.wait_exit(timeout=30) == 1
        assert held.exception() is not None
    assert "SIGTERM again: exiting now" in process.output


def test_access_log_has_one_text_line_per_call(sidecar: SidecarProcess, pki: Pki) -> None:
    with sidecar.channel(pki) as channel:
        channel.unary_unary(UNARY)(b"12345", timeout=10)
    with sidecar.channel(pki, "mallory") as channel, pytest.raises(grpc.RpcError):
        channel.unary_unary(UNARY)(b"x", timeout=10)
    allowed = sidecar.wait_for(
        r"INFO sidecar.access: /probe.Probe/Unary peer='CN=alice' remote=ipv4:127.0.0.1:\d+ "
        r"code=OK duration_ms=[\d.]+ bytes_in=5 bytes_out=5"
    )
    denied = sidecar.wait_for(
        r"sidecar.access: /probe.Probe/Unary peer='CN=mallory' .* code=PERMISSION_DENIED"
    )
    assert allowed and denied
    assert sum("sidecar.access" in line for line in sidecar.lines) == 2


def test_json_log_format_writes_one_json_object_per_line(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    process = sidecars.serving(probe.port, "--allow-cn", "alice", "--log-format", "json")
    with process.channel(pki) as channel:
        channel.unary_unary(UNARY)(b"abc", timeout=10, metadata=[("x-probe-count", "1")])
    process.wait_for('"logger": "sidecar.access"')
    records = [json.loads(line) for line in process.lines]  # every line is JSON
    (access,) = [r for r in records if r["logger"] == "sidecar.access"]
    assert access["method"] == UNARY
    assert access["peer"] == "CN=alice"
    assert access["code"] == "OK"
    assert access["bytes_in"] == 3 and access["bytes_out"] == 3
    assert access["duration_ms"] >= 0
    assert any("listening on" in r["message"] for r in records)
