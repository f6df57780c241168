"""Revoked certificates (deny_serials, deny_fingerprints) are refused whatever the allow rules
say, on both data planes, with a reason naming the revocation; the app never sees their calls."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.conftest import Pki, SidecarFactory, assert_config_error
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"


def _certificate(pki: Pki, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.cert(name).read_bytes())


def _as_openssl_prints(data: bytes) -> str:
    return ":".join(f"{byte:02X}" for byte in data)


def _code(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    try:
        channel.unary_unary(UNARY)(b"x", timeout=10)
    except grpc.RpcError as error:
        return error.code(), str(error.details())
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_revoked_serial_or_fingerprint_is_refused_whatever_the_rules(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, data_plane: str
) -> None:
    alice, carol = _certificate(pki, "alice"), _certificate(pki, "carol")
    serial = f"serial={alice.serial_number:040X}"  # as `openssl x509 -serial` prints it
    fingerprint = _as_openssl_prints(carol.fingerprint(hashes.SHA256()))
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--allow-cn", "carol", "--allow-cn", "mallory",
        "--deny-serials", serial, "--deny-fingerprints", fingerprint,
        "--data-plane", data_plane,
    )  # fmt: skip
    for name, revocation in (
        ("alice", f"certificate serial {alice.serial_number:x} is revoked (deny_serials)"),
        ("carol", f"fingerprint {carol.fingerprint(hashes.SHA256()).hex()} is revoked"),
    ):
        with sidecar.channel(pki, name) as channel:
            code, details = _code(channel)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code, details)
        assert f"peer CN={name}" in details and revocation in details, details
    with sidecar.channel(pki, "mallory") as mallory:
        assert _code(mallory)[0] == grpc.StatusCode.OK
    assert len(probe.calls) == 1


def test_a_serial_added_by_a_reload_ends_the_callers_open_connection(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.yaml"
    route = {
        "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{probe.port}",
        "cert": str(pki.cert("server")), "key": str(pki.key("server")),
        "ca": str(pki.dir / "ca.pem"), "allow_cn": ["alice"],
    }  # fmt: skip
    config.write_text(yaml.safe_dump(route))
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    with sidecar.channel(pki, "alice") as alice:
        assert _code(alice)[0] == grpc.StatusCode.OK
        serial = _certificate(pki, "alice").serial_number
        config.write_text(yaml.safe_dump({**route, "deny_serials": [f"{serial:x}"]}))
        sidecar.signal(signal.SIGHUP)
        sidecar.wait_for("CN=alice is no longer allowed")
        code, details = _code(alice)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "is revoked" in details, details


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--deny-serials", "0A:ZZ", "--deny-serials: '0A:ZZ' is not hexadecimal"),
        ("--deny-fingerprints", "AB:CD", "is not a SHA-256 fingerprint (64 hex digits)"),
    ],
)
def test_a_revocation_that_is_not_hex_exits_2(
    sidecars: SidecarFactory, pki: Pki, flag: str, value: str, expected: str
) -> None:
    args = ["--upstream", "127.0.0.1:1", "--allow-cn", "alice", flag, value,
            *sidecars.tls_args()]  # fmt: skip
    assert_config_error(sidecars, args, expected)
