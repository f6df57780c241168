"""Egress: a plain local client reaches a remote over mTLS, and is told plainly when it cannot.

The relay's conformance (call types, metadata, status, deadlines, sizes) runs
through egress -> ingress in test_relay.py; these are the egress-specific behaviours.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import grpc
import pytest

from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"


def call_through(egress: SidecarProcess) -> grpc.RpcError | bytes:
    with grpc.insecure_channel(f"127.0.0.1:{egress.port}") as channel:
        try:
            reply: bytes = channel.unary_unary(UNARY)(b"ping", timeout=10)
        except grpc.RpcError as error:
            return error
    return reply


def refused(outcome: grpc.RpcError | bytes) -> grpc.RpcError:
    assert isinstance(outcome, grpc.RpcError), f"the call went through: {outcome!r}"
    assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome.details()
    return outcome


def test_wrong_server_name_gives_unavailable_saying_the_name_does_not_match(
    sidecars: SidecarFactory, probe: Probe
) -> None:
    ingress = sidecars.serving(probe.port, "--allow-cn", "alice")
    egress = sidecars.egress(ingress.port, "--server-name", "app.example")
    details = refused(call_through(egress)).details()
    assert f"upstream 127.0.0.1:{ingress.port} unavailable" in details
    assert "does not match server name 'app.example'" in details
    assert "DNS:localhost, IP:127.0.0.1" in details  # what the remote does carry
    assert "set --server-name" in details
    egress.wait_for(r"WARNING sidecar.egress: remote .*does not match server name 'app.example'")
    assert probe.calls == []


def test_server_name_overrides_the_upstream_host(sidecars: SidecarFactory, probe: Probe) -> None:
    ingress = sidecars.serving(probe.port, "--allow-cn", "alice")
    egress = sidecars.egress(ingress.port, "--server-name", "localhost")
    egress.wait_for("expecting server name 'localhost'")
    assert call_through(egress) == b"ping"


def test_untrusted_remote_gives_unavailable_saying_it_is_not_trusted(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    rogue = sidecars.start(
        "--upstream",
        f"127.0.0.1:{probe.port}",
        "--cert",
        str(pki.cert("rogue-server")),
        "--key",
        str(pki.key("rogue-server")),
        "--ca",
        str(pki.dir / "ca.pem"),
        "--allow-all",
        default_tls=False,
    )
    egress = sidecars.egress(rogue.wait_ready())
    details = refused(call_through(egress)).details()
    assert "the remote's certificate is not trusted by --ca" in details
    assert "issued by CN=Some Other CA" in details
    assert probe.calls == []


def test_remote_refusing_our_certificate_is_named_as_the_cause(
    sidecars: SidecarFactory, probe: Probe
) -> None:
    ingress = sidecars.serving(probe.port, "--allow-cn", "alice")
    egress = sidecars.egress(ingress.port, client="stranger")  # signed by another CA
    details = refused(call_through(egress)).details()
    assert "the remote refused this route's client certificate CN=alice" in details
    assert "issued by CN=Some Other CA" in details
    assert "from --cert" in details
    assert probe.calls == []


def test_a_remote_that_does_not_speak_tls_is_named_as_such(
    sidecars: SidecarFactory, probe: Probe
) -> None:
    egress = sidecars.egress(probe.port)  # the plaintext app itself, not its sidecar
    details = refused(call_through(egress)).details()
    assert "the remote does not speak TLS" in details
    assert probe.calls == []


def test_denial_at_the_remote_reaches_the_local_client_with_its_reason(
    sidecars: SidecarFactory, probe: Probe
) -> None:
    chain = sidecars.chain(probe.port, "--allow-cn", "bob")
    outcome = call_through(chain.egress)
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.PERMISSION_DENIED
    assert outcome.details() == f"peer CN=alice is not allowed to call {UNARY}"
    assert probe.calls == []


def test_remote_down_gives_unavailable_naming_the_remote(sidecars: SidecarFactory) -> None:
    with socket.socket() as placeholder:  # a port with nothing listening on it
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    egress = sidecars.egress(port)
    details = refused(call_through(egress)).details()
    assert f"upstream 127.0.0.1:{port} unavailable" in details
    assert "Connection refused" in details


def test_egress_listens_on_a_unix_socket(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    ingress = sidecars.serving(probe.port, "--allow-cn", "alice")
    socket_path = tmp_path / "egress.sock"
    egress = sidecars.egress(ingress.port, listen=f"unix:{socket_path}", wait=False)
    egress.wait_for(f"egress listening on unix:{socket_path}")
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        assert channel.unary_unary(UNARY)(b"over a socket", timeout=10) == b"over a socket"
    ingress.wait_for(r"/probe.Probe/Unary peer='CN=alice'.* code=OK")


@pytest.mark.parametrize("client", ["alice", "carol"])
def test_the_remote_sees_the_egress_certificate_as_the_caller(
    sidecars: SidecarFactory, probe: Probe, client: str
) -> None:
    ingress = sidecars.serving(probe.port, "--allow-cn", "alice", "--allow-cn", "carol")
    egress = sidecars.egress(ingress.port, client=client)
    egress.wait_for(f"as CN={client}")
    assert call_through(egress) == b"ping"
    ingress.wait_for(rf"/probe.Probe/Unary peer='CN={client}\b.* code=OK")


@pytest.mark.parametrize("remote_plane", ["splice", "grpc"])
def test_every_call_refused_for_our_certificate_gets_the_reason(
    sidecars: SidecarFactory, probe: Probe, remote_plane: str
) -> None:
    """Call after call (a new connection each), never a bare transport error: a TLS 1.3
    remote refuses our certificate after our side of the handshake, sometimes before the
    connection was fully set up here ('NoneType' object has no attribute 'setsockopt')."""
    ingress = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", remote_plane)
    egress = sidecars.egress(ingress.port, client="stranger")
    for _ in range(8):
        details = refused(call_through(egress)).details()
        assert "the remote refused this route's client certificate CN=alice" in details, details
    egress.wait_for(r"WARNING sidecar.egress: remote .*refused this route's client certificate")
    assert "Traceback" not in egress.output
    assert probe.calls == []


def test_remote_down_is_one_warning_however_many_calls_fail(sidecars: SidecarFactory) -> None:
    with socket.socket() as placeholder:  # a port with nothing listening on it
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    egress = sidecars.egress(port)
    for _ in range(5):
        assert "Connection refused" in refused(call_through(egress)).details()
    warning = rf"WARNING .*upstream 127\.0\.0\.1:{port} unavailable: Connection refused"
    egress.wait_for(warning)
    assert len([line for line in egress.lines if re.search(warning, line)]) == 1
