"""TLS session resumption on an ingress: `session_tickets` (default 1) lets a caller that
keeps a session resume it, with the identity of its certificate; 0 sends none."""

from __future__ import annotations

import re

import pytest

from tests.conftest import Pki, SidecarFactory, assert_config_error
from tests.hostile.peers import RawPeer
from tests.probe import Probe

OPENED = r"connection from ipv4:127\.0\.0\.1:\d+ opened: peer CN=alice, spliced"


def _unary(peer: RawPeer) -> str:
    """One call on the peer's connection: its grpc-status."""
    peer.settle()
    peer.call(1, body=b"hello")
    return peer.status(1)["grpc-status"]


@pytest.mark.parametrize("tickets", ["1", "0"])
def test_a_caller_resumes_its_session_with_its_identity_unless_tickets_are_off(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tickets: str
) -> None:
    process = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--log-level", "debug", "--session-tickets", tickets
    )
    with RawPeer(process.port, pki) as first:
        assert _unary(first) == "0"
        session = first.sock.session  # type: ignore[attr-defined]  # (an SSLSocket's)
        assert session is not None
        assert session.has_ticket == (tickets == "1")  # the ticket came after the handshake
    with RawPeer(process.port, pki, session=session) as second:
        assert second.sock.session_reused == (tickets == "1")  # type: ignore[attr-defined]
        assert _unary(second) == "0"
    process.wait_for_count("opened: peer CN=alice, spliced", 2)
    opened = [line for line in process.lines if re.search(OPENED, line)]
    assert "resumed" not in opened[0]
    assert opened[1].endswith("spliced, TLS session resumed") == (tickets == "1"), opened[1]
    # The resumed connection's calls are its certificate's caller's.
    process.wait_for_count("sidecar.access: /probe.Probe/Unary peer='CN=alice", 2)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--session-tickets", "-1"], "--session-tickets: -1 must be at least 0"),
        (["--session-tickets", "1000"], "--session-tickets: 1000 is out of range (at most 8)"),
        (["--session-tickets", "1", "--data-plane", "grpc"], "--session-tickets applies to "
         "data_plane splice only"),
    ],
)  # fmt: skip
def test_session_tickets_is_refused_where_it_cannot_apply(
    sidecars: SidecarFactory, args: list[str], expected: str
) -> None:
    assert_config_error(
        sidecars,
        ["--upstream", "127.0.0.1:1", "--allow-cn", "alice", *sidecars.tls_args(), *args],
        expected,
    )


def test_workers_resume_each_others_sessions(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """Two workers encrypt tickets with the same keys: a session resumes whichever worker
    accepts the connection (each with keys of its own, about half would not)."""
    process = sidecars.serving(probe.port, "--allow-cn", "alice", "--workers", "2")
    process.wait_for("workers: 2 serving")
    with RawPeer(process.port, pki) as first:
        assert _unary(first) == "0"
        session = first.sock.session  # type: ignore[attr-defined]
    resumed = []
    for _ in range(24):
        with RawPeer(process.port, pki, session=session) as peer:
            resumed.append(peer.sock.session_reused)  # type: ignore[attr-defined]
            assert _unary(peer) == "0"
    assert all(resumed), resumed
    process.wait_for_count("sidecar.access: /probe.Probe/Unary worker=", 25)
    served_by = set(re.findall(r"sidecar\.access: /probe\.Probe/Unary worker=(\d)",
                               "\n".join(process.lines)))  # fmt: skip
    assert served_by == {"0", "1"}, "both workers must have resumed sessions"
