"""A route whose credentials come from a SPIFFE Workload API: the sidecar fetches its
X.509-SVID and trust bundle from an agent (here a fake one the test runs on a unix
socket, tests/spiffe_agent.py) and follows what the agent pushes, for new handshakes,
without a restart.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sidecar import certs
from tests.conftest import SidecarFactory, SidecarProcess, assert_config_error
from tests.probe import Probe
from tests.spiffe_agent import FakeAgent, svid_response
from tests.test_reload import _served_serial as served_serial

UNARY = "/probe.Probe/Unary"
SERVER_ID = "spiffe://example.org/sidecar"
CLIENT_ID = "spiffe://example.org/client"


def _svid(ca: certs.Issued, **kwargs: object) -> certs.Issued:
    """An X.509-SVID for the sidecar: its SPIFFE ID, and the names a gRPC client dials."""
    return certs.issue(ca, "sidecar", usage="both", uris=[SERVER_ID], dns=["localhost"],
                       ips=["127.0.0.1"], **kwargs)  # type: ignore[arg-type]  # fmt: skip


def _client(ca: certs.Issued, trusted: list[certs.Issued]) -> grpc.ChannelCredentials:
    issued = certs.issue(ca, "client", usage="client", uris=[CLIENT_ID])
    roots = b"".join(authority.cert_pem for authority in trusted)
    return grpc.ssl_channel_credentials(roots, issued.key_pem, issued.cert_pem)


def _served_serial(port: int, trusted: list[certs.Issued]) -> int:
    context = ssl.create_default_context(cadata="".join(a.cert_pem.decode() for a in trusted))
    context.set_alpn_protocols(["h2"])
    return served_serial(port, context)


def _call(port: int, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        try:
            channel.unary_unary(UNARY)(b"x", timeout=10)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path / "agent.sock").start()
    yield fake
    fake.stop()


def _start(sidecars: SidecarFactory, probe: Probe, *args: str, **kwargs: object) -> SidecarProcess:
    return sidecars.serving(probe.port, "--allow-uri", CLIENT_ID, *args, default_tls=False,
                            **kwargs)  # fmt: skip


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_the_agents_rotations_and_new_bundle_serve_new_handshakes_without_a_restart(
    sidecars: SidecarFactory, probe: Probe, agent: FakeAgent, data_plane: str
) -> None:
    old_ca, new_ca = certs.init_ca("SPIRE CA 1"), certs.init_ca("SPIRE CA 2")
    first = _svid(old_ca)
    agent.push(svid_response(first, SERVER_ID, [old_ca]))
    sidecar = _start(sidecars, probe, "--spiffe-socket", agent.address, "--data-plane", data_plane)
    trusted = [old_ca, new_ca]
    old_client = _client(old_ca, trusted)
    assert _served_serial(sidecar.port, trusted) == first.certificate.serial_number
    with grpc.secure_channel(f"127.0.0.1:{sidecar.port}", old_client) as established:
        call = established.unary_unary(UNARY)
        assert call(b"1", timeout=10) == b"1"

        # A rotation: the next handshake is served the new SVID; the connection made
        # before goes on.
        second = _svid(old_ca)
        agent.push(svid_response(second, SERVER_ID, [old_ca]))
        serial = second.certificate.serial_number
        sidecar.wait_for(f"credentials updated by the SPIFFE Workload API: certificate serial "
                         f"{serial:x}, CN=sidecar, {SERVER_ID}")  # fmt: skip
        assert _served_serial(sidecar.port, trusted) == serial
        assert call(b"2", timeout=10) == b"2"

    # A new trust bundle (the new CA only) with an SVID of the new CA: callers of the new
    # CA are let in, those of the old one no longer.
    third = _svid(new_ca)
    agent.push(svid_response(third, SERVER_ID, [new_ca]))
    sidecar.wait_for(f"certificate serial {third.certificate.serial_number:x}")
    assert _call(sidecar.port, _client(new_ca, trusted)) == grpc.StatusCode.OK
    assert _call(sidecar.port, old_client) == grpc.StatusCode.UNAVAILABLE

    # An update that fails the start-up checks (an expired SVID) is refused with one
    # ERROR; the last good one serves on.
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)
    expired = _svid(new_ca, days=1, not_before=long_ago)
    agent.push(svid_response(expired, SERVER_ID, [new_ca]))
    line = sidecar.wait_for("ERROR .*SPIFFE update not used, the current SVID stays: .*")
    assert "expired" in line.group(0), line.group(0)
    assert _served_serial(sidecar.port, trusted) == third.certificate.serial_number
    assert _call(sidecar.port, _client(new_ca, trusted)) == grpc.StatusCode.OK
    assert sidecar.proc.poll() is None
    assert sum("SPIFFE" in line and "ERROR" in line for line in sidecar.lines) == 1


def test_a_federated_domains_ca_cannot_vouch_for_names_of_this_one(
    sidecars: SidecarFactory, probe: Probe, agent: FakeAgent
) -> None:
    """The agent sends a partner's bundle too: a certificate its CA signed for this domain's
    allowed SPIFFE ID is refused at the handshake (only the SVID's own domain is trusted)."""
    own_ca, partner_ca = certs.init_ca("example.org CA"), certs.init_ca("partner.org CA")
    federated = {"spiffe://partner.org": partner_ca}
    agent.push(svid_response(_svid(own_ca), SERVER_ID, [own_ca], federated))
    sidecar = _start(sidecars, probe, "--spiffe-socket", agent.address)
    trusted = [own_ca]
    assert _call(sidecar.port, _client(own_ca, trusted)) == grpc.StatusCode.OK
    assert _call(sidecar.port, _client(partner_ca, trusted)) == grpc.StatusCode.UNAVAILABLE
    assert len(probe.calls) == 1, "the partner-signed caller reached the app"


def test_spiffe_endpoint_socket_is_the_default_and_an_agent_late_is_waited_for(
    sidecars: SidecarFactory, probe: Probe, tmp_path: Path
) -> None:
    """With no cert, key or ca, SPIFFE_ENDPOINT_SOCKET names the agent (as SPIFFE's own
    tools read it); an agent that comes up after the sidecar is waited for."""
    socket_path = tmp_path / "late.sock"
    env = {"SPIFFE_ENDPOINT_SOCKET": f"unix://{socket_path}"}
    sidecar = sidecars.start("--upstream", f"127.0.0.1:{probe.port}", "--allow-uri", CLIENT_ID,
                             default_tls=False, env=env)  # fmt: skip
    ca = certs.init_ca("SPIRE CA")
    agent = FakeAgent(socket_path)
    agent.push(svid_response(_svid(ca), SERVER_ID, [ca]))
    agent.start()
    try:
        sidecar.wait_ready()
        assert _call(sidecar.port, _client(ca, [ca])) == grpc.StatusCode.OK
    finally:
        agent.stop()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--spiffe-socket", "/run/spire/agent.sock"], "--spiffe-socket: expected unix:/"),
        (["--spiffe-socket", "unix:relative.sock"], "--spiffe-socket: expected unix:/"),
        (["--spiffe-socket", "unix://host/agent.sock"], "--spiffe-socket: expected unix:/"),
        (["--spiffe-socket", "unix:/a.sock", "--cert", "x.pem"],
         "--spiffe-socket replaces cert, key and ca, but --cert is given too"),
    ],
)  # fmt: skip
def test_a_bad_spiffe_socket_setting_exits_2_with_one_line(
    sidecars: SidecarFactory, args: list[str], expected: str
) -> None:
    assert_config_error(sidecars, ["--upstream", "127.0.0.1:1", "--allow-all", *args], expected)


def test_no_agent_at_start_exits_1_naming_the_socket(
    sidecars: SidecarFactory, tmp_path: Path
) -> None:
    missing = tmp_path / "absent.sock"
    result = sidecars.run("--upstream", "127.0.0.1:1", "--allow-all", "--listen", "127.0.0.1:0",
                          "--spiffe-socket", f"unix:{missing}", timeout=90)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"--spiffe-socket unix:{missing}: no X.509-SVID from the SPIFFE Workload API" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
