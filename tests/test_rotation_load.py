"""Rotation is a non-event: under steady load (16 callers with mTLS straight to an ingress
sidecar, 4 more through an egress sidecar, each opening a new connection every 20 calls),
the ingress certificate is rotated 5 times, its CA bundle moves to a new CA (both CAs
during the overlap, then the new one only), the callers and the egress route move to
certificates of the new CA, and not one call fails. After each rotation a new connection
is served the new certificate, as the client side of a TLS handshake reads it.
"""

from __future__ import annotations

import signal
import ssl
from pathlib import Path

import grpc
import pytest

from sidecar import certs
from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.load import Load
from tests.probe import Probe
from tests.test_reload import _served_serial as served_serial


class Rotation:
    """The files both sidecars read, and what the callers present and trust."""

    def __init__(self, pki: Pki, directory: Path) -> None:
        self.old_ca, self.new_ca = pki.ca, certs.init_ca("Rotated Root CA")
        self.dir = directory
        self.trusted = self.old_ca.cert_pem + self.new_ca.cert_pem  # what callers trust
        self.server_ca(self.old_ca.cert_pem)
        self.server(self.old_ca)
        self.client(self.old_ca)
        self.egress_client(self.old_ca)
        (directory / "egress-ca.pem").write_bytes(self.trusted)

    def server(self, ca: certs.Issued) -> int:
        issued = certs.issue(ca, "localhost", usage="server", ips=["127.0.0.1"])
        issued.write(self.dir, "server")
        return issued.certificate.serial_number

    def server_ca(self, bundle: bytes) -> None:
        (self.dir / "server-ca.pem").write_bytes(bundle)

    def client(self, ca: certs.Issued) -> None:
        """The certificate the direct callers present on their next connections."""
        issued = certs.issue(ca, "alice", usage="client")
        self._client = (issued.key_pem, issued.cert_pem)

    def egress_client(self, ca: certs.Issued) -> None:
        certs.issue(ca, "alice", usage="client").write(self.dir, "egress")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.trusted, *self._client)

    def served_serial(self, port: int) -> int:
        """The serial of the certificate a new connection to port is served."""
        context = ssl.create_default_context(cadata=self.trusted.decode())
        context.set_alpn_protocols(["h2"])
        return served_serial(port, context)


def _reload(sidecar: SidecarProcess, outcome: str) -> None:
    before = sum(outcome in line for line in sidecar.lines)
    sidecar.signal(signal.SIGHUP)
    sidecar.wait_for_count(outcome, before + 1)


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_rotations_under_load_fail_no_call(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    files = Rotation(pki, tmp_path)
    ingress = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--data-plane", data_plane,
        "--cert", str(tmp_path / "server.pem"), "--key", str(tmp_path / "server.key"),
        "--ca", str(tmp_path / "server-ca.pem"),
        default_tls=False,
    )  # fmt: skip
    egress = sidecars.start(
        "--mode", "egress", "--upstream", f"127.0.0.1:{ingress.port}",
        "--data-plane", data_plane,
        "--cert", str(tmp_path / "egress.pem"), "--key", str(tmp_path / "egress.key"),
        "--ca", str(tmp_path / "egress-ca.pem"),
        default_tls=False,
    )  # fmt: skip
    egress.wait_ready()
    reloaded = "credentials reloaded: certificate serial"
    direct = Load(f"127.0.0.1:{ingress.port}", files.credentials, workers=16)
    chained = Load(f"127.0.0.1:{egress.port}", None, workers=4)
    with direct, chained:

        def steady() -> None:
            direct.wait_for_calls(200)
            chained.wait_for_calls(50)

        steady()
        for _ in range(5):
            serial = files.server(files.old_ca)
            _reload(ingress, f"{reloaded} {serial:x}")
            assert files.served_serial(ingress.port) == serial
            steady()

        files.server_ca(files.old_ca.cert_pem + files.new_ca.cert_pem)  # the overlap
        _reload(ingress, reloaded)
        files.client(files.new_ca)
        files.egress_client(files.new_ca)
        _reload(egress, reloaded)
        serial = files.server(files.new_ca)
        _reload(ingress, f"{reloaded} {serial:x}")
        assert files.served_serial(ingress.port) == serial
        steady()

        files.server_ca(files.new_ca.cert_pem)  # the old CA retired
        _reload(ingress, reloaded)
        steady()
    for load in (direct, chained):
        assert load.result.failures == [], load.result.failures[:5]
    assert direct.result.connections > 16 * 5 and chained.result.connections > 4 * 5

    # The old CA is gone for good: a caller still presenting one of its certificates is
    # refused at the handshake.
    files.client(files.old_ca)
    target = f"127.0.0.1:{ingress.port}"
    with (
        grpc.secure_channel(target, files.credentials()) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        channel.unary_unary("/probe.Probe/Unary")(b"x", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
