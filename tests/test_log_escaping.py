"""Log injection: what a caller controls (its `:path`, its certificate's names) never reaches a
text log line unescaped, on either data plane; the JSON format carries it intact."""

from __future__ import annotations

import json
import re

import grpc
import pytest

from sidecar import certs
from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.hostile.peers import END_HEADERS, END_STREAM, HEADERS, RawPeer, request_block
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"
PLANES = ["splice", "grpc"]
# A whole access line, as the sidecar would write it: what a line feed in a field would forge.
FORGED = "2026-01-01 00:00:00,000 INFO sidecar.access: /kv.KV/Put peer='CN=admin' code=OK"
# Line breaks and terminal controls that are not CR or LF (which RFC 9113 already refuses in
# field values): ESC, VT, FF, NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR, RIGHT-TO-LEFT OVERRIDE.
CONTROLS = "\x1b[2J\x0b\x0c\x85\u2028\u2029\u202e"
CONTROLS_SHOWN = r"\x1b[2J\x0b\x0c\x85\u2028\u2029\u202e"
CONTROL_CHARACTERS = set(CONTROLS) - set("[2J")
# How each of the sidecar's records starts (and grpc core's own, which it may print).
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ |[EWI]\d{4} ")
# The injector's CN (a CN is at most 64 characters): a line feed, then a forged line's start.
INJECTOR_CN = "mallory\nFORGED \x1b[31m\u2028"
INJECTOR_SHOWN = r"CN=mallory\nFORGED \x1b[31m\u2028"


@pytest.fixture(scope="module")
def injector(pki: Pki) -> Pki:
    """The test PKI with a client certificate whose CN carries a line feed and controls."""
    certs.issue(pki.ca, INJECTOR_CN, usage="client").write(pki.dir, "log-injector")
    return pki


def _send(sidecar: SidecarProcess, pki: Pki, client: str, method: str) -> None:
    """One call to `method`, sent as raw HTTP/2 (a gRPC library may refuse such a :path)."""
    with RawPeer(sidecar.port, pki, client) as peer:
        peer.send_frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block(method))
        # The answer (or the connection's end) shows the sidecar has handled the call.
        peer.read_until(HEADERS, 1)


def _logged_so_far(sidecar: SidecarProcess, pki: Pki) -> list[str]:
    """The sidecar's log up to now: once alice's call is logged, every earlier line is out."""
    with sidecar.channel(pki, "alice") as channel:
        channel.unary_unary(UNARY)(b"x", timeout=5)
    sidecar.wait_for(rf"{UNARY} peer='CN=alice' .* code=OK")
    return list(sidecar.lines)


def _assert_one_line_each(lines: list[str]) -> None:
    """No record was forged or broken: each line is one whole record, none holds a control."""
    assert not any(line.startswith(("FORGED", FORGED[:23])) for line in lines), "\n".join(lines)
    broken = [line for line in lines if not RECORD.match(line)]
    assert not broken, "\n".join(lines)
    raw = [line for line in lines if CONTROL_CHARACTERS.intersection(line)]
    assert not raw, "\n".join(raw)


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("client", ["alice", "mallory"])
def test_method_with_a_line_feed_cannot_forge_a_log_line(
    sidecars: SidecarFactory, probe: Probe, pki: Pki, plane: str, client: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", plane)
    _send(sidecar, pki, client, f"{UNARY}\n{FORGED}")
    _assert_one_line_each(_logged_so_far(sidecar, pki))


@pytest.mark.parametrize("plane", PLANES)
def test_method_in_the_access_line_is_escaped(
    sidecars: SidecarFactory, probe: Probe, pki: Pki, plane: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", plane)
    _send(sidecar, pki, "alice", f"{UNARY}{CONTROLS} peer='CN=admin'")
    lines = _logged_so_far(sidecar, pki)
    _assert_one_line_each(lines)
    # Spaces too: the method stays one word, so it cannot pass for the fields after it.
    shown = rf"{UNARY}{CONTROLS_SHOWN}\x20peer='CN=admin'"
    assert any(f"sidecar.access: {shown} peer='CN=alice' " in line for line in lines), lines


def _ends_with_denial(line: str, denial: str) -> bool:
    """The line ends with the denial and then only the caller's address: nothing a caller
    sent runs on past its place."""
    return re.search(re.escape(denial) + r" \(from [a-z0-9.:\[\]]+\)$", line) is not None


@pytest.mark.parametrize("plane", PLANES)
def test_method_in_the_denial_line_is_escaped(
    sidecars: SidecarFactory, probe: Probe, pki: Pki, plane: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", plane)
    _send(sidecar, pki, "mallory", f"{UNARY}{CONTROLS}")
    lines = _logged_so_far(sidecar, pki)
    _assert_one_line_each(lines)
    denial = f"denied: peer CN=mallory is not allowed to call {UNARY}{CONTROLS_SHOWN}"
    assert any(_ends_with_denial(line, denial) for line in lines), lines
    shown = f"sidecar.access: {UNARY}{CONTROLS_SHOWN} peer='CN=mallory' "
    assert any(shown in line for line in lines), lines


@pytest.mark.parametrize("plane", PLANES)
def test_certificate_names_in_the_denial_and_access_lines_are_escaped(
    sidecars: SidecarFactory, probe: Probe, injector: Pki, plane: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "*", "--data-plane", plane)
    # A CN with controls matches no rule, not even "*".
    with (
        sidecar.channel(injector, "log-injector") as channel,
        pytest.raises(grpc.RpcError) as denied,
    ):
        channel.unary_unary(UNARY)(b"x", timeout=5)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.value.details() == f"peer {INJECTOR_SHOWN} is not allowed to call {UNARY}"
    lines = _logged_so_far(sidecar, injector)
    _assert_one_line_each(lines)
    denial = f"denied: peer {INJECTOR_SHOWN} is not allowed to call {UNARY}"
    assert any(_ends_with_denial(line, denial) for line in lines), lines
    assert any(f"{UNARY} peer='{INJECTOR_SHOWN}' " in line for line in lines), lines


@pytest.mark.parametrize("plane", PLANES)
def test_json_lines_carry_caller_text_intact_one_object_per_line(
    sidecars: SidecarFactory, probe: Probe, injector: Pki, plane: str
) -> None:
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--data-plane", plane, "--log-format", "json"
    )
    method = f"{UNARY}{CONTROLS}\u0131"
    _send(sidecar, injector, "mallory", method)
    with sidecar.channel(injector, "log-injector") as channel, pytest.raises(grpc.RpcError):
        channel.unary_unary(UNARY)(b"x", timeout=5)
    with sidecar.channel(injector, "alice") as channel:
        channel.unary_unary(UNARY)(b"x", timeout=5)
    sidecar.wait_for(r'"peer": "CN=alice"')
    entries = [json.loads(line) for line in sidecar.lines]  # each line one whole object
    assert all(line.isascii() and line.isprintable() for line in sidecar.lines)
    assert any(entry.get("method") == method for entry in entries)
    assert any(entry.get("peer") == INJECTOR_SHOWN for entry in entries)  # its description
    # The denial as fields of its own: what was called, by whom, from where, and why.
    denial = next(e for e in entries if e.get("event") == "denied" and e["method"] == method)
    assert denial["peer"] == "CN=mallory" and denial["remote"].startswith("ipv4:127.0.0.1:")
    assert denial["reason"].startswith("peer CN=mallory is not allowed to call"), denial
