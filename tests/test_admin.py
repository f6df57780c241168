"""The admin listener (--admin): /metrics counts what happened, /readyz follows the app and
the certificate, /healthz and /status answer, and a hostile client of it gets nothing more
than a caller would."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Pki, SidecarFactory, SidecarProcess, assert_config_error, wait_until
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"


def _admin_port(sidecar: SidecarProcess) -> int:
    return int(sidecar.wait_for(r"admin: .* served at 127\.0\.0\.1:(\d+)").group(1))


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _samples(port: int, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric, by their labels (sorted), from a scrape of /metrics."""
    status, text = _get(port, "/metrics")
    assert status == 200, text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def _code(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        channel.unary_unary(UNARY)(b"x", timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_metrics_count_calls_by_method_and_code(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, data_plane: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--admin", "127.0.0.1:0",
                               "--data-plane", data_plane)  # fmt: skip
    admin = _admin_port(sidecar)
    with sidecar.channel(pki, "alice") as alice:
        assert _code(alice) == grpc.StatusCode.OK
        assert _code(alice) == grpc.StatusCode.OK
    with sidecar.channel(pki, "mallory") as mallory:
        assert _code(mallory) == grpc.StatusCode.PERMISSION_DENIED
    probe.stop()
    with sidecar.channel(pki, "alice") as alice:
        assert _code(alice) == grpc.StatusCode.UNAVAILABLE

    def route(code: str) -> tuple[tuple[str, str], ...]:
        return (("code", code), ("method", UNARY), ("route", "ingress"))

    expected = {route("OK"): 2.0, route("PERMISSION_DENIED"): 1.0, route("UNAVAILABLE"): 1.0}
    wait_until(lambda: _samples(admin, "sidecar_calls_total") == expected)
    assert _samples(admin, "sidecar_call_duration_seconds_count") == {(("route", "ingress"),): 4}
    own = x509.load_pem_x509_certificate(pki.cert("server").read_bytes()).not_valid_after_utc
    expiry = _samples(admin, "sidecar_certificate_expiry_timestamp_seconds")
    assert expiry[(("route", "ingress"), ("which", "own"))] == own.timestamp()


def test_readyz_follows_the_app_and_healthz_the_process(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--admin", "127.0.0.1:0")
    admin = _admin_port(sidecar)
    wait_until(lambda: _get(admin, "/readyz")[0] == 200)
    port = probe.port
    probe.stop()
    wait_until(lambda: _get(admin, "/readyz")[0] == 503)
    body = json.loads(_get(admin, "/readyz")[1])
    assert body["ready"] is False
    assert f"upstream 127.0.0.1:{port} does not answer" in body["not_ready"][0], body
    assert _get(admin, "/healthz") == (200, "ok\n")
    probe.start(port)
    wait_until(lambda: _get(admin, "/readyz")[0] == 200)


def _short_lived_server_certificate(pki: Pki, directory: Path, seconds: int) -> list[str]:
    """The sidecar's --cert/--key/--ca, its certificate valid for `seconds` more."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(seconds=seconds))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(pki.ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert, key_file = directory / "short.pem", directory / "short.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ["--cert", str(cert), "--key", str(key_file), "--ca", str(pki.dir / "ca.pem")]


def test_readyz_says_when_the_certificate_has_expired(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    tls = _short_lived_server_certificate(pki, tmp_path, seconds=4)
    sidecar = sidecars.serving(probe.port, *tls, "--allow-cn", "alice", "--admin", "127.0.0.1:0",
                               default_tls=False)  # fmt: skip
    admin = _admin_port(sidecar)
    wait_until(lambda: _get(admin, "/readyz")[0] == 200)
    wait_until(lambda: _get(admin, "/readyz")[0] == 503)
    assert "its certificate is not valid now" in _get(admin, "/readyz")[1]


def test_status_describes_each_route_without_key_material(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--admin", "127.0.0.1:0")
    status, body = _get(_admin_port(sidecar), "/status")
    assert status == 200
    (route,) = json.loads(body)["routes"]
    server = x509.load_pem_x509_certificate(pki.cert("server").read_bytes())
    assert route["certificate"]["serial"] == format(server.serial_number, "x")
    assert route["listen"] == f"127.0.0.1:{sidecar.port}"
    assert "PRIVATE" not in body and pki.key("server").read_text() not in body


def test_a_hostile_admin_client_gets_an_error_and_the_listener_serves_on(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--admin", "127.0.0.1:0")
    admin = _admin_port(sidecar)
    for request in (
        b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",  # over 8 KiB
        b"POST /healthz HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello\r\n\r\n",  # TLS bytes on the plain port
    ):
        with socket.create_connection(("127.0.0.1", admin), timeout=10) as client:
            client.sendall(request)
            answer = client.recv(4096)
        assert answer.split(b" ")[1] in (b"400", b"405"), answer
    assert _get(admin, "/nothing")[0] == 404
    assert _get(admin, "/healthz") == (200, "ok\n")


def test_idle_admin_connections_cannot_keep_a_probe_out(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """Any local process can open connections to the admin port and send nothing: beyond
    64, the oldest idle one is closed for the newcomer, so liveness still answers."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--admin", "127.0.0.1:0")
    admin = _admin_port(sidecar)
    idle = [socket.create_connection(("127.0.0.1", admin), timeout=10) for _ in range(100)]
    try:
        assert _get(admin, "/healthz") == (200, "ok\n")
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "probe", "/healthz", "--admin",
             f"127.0.0.1:{admin}"], capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for connection in idle:
            connection.close()
    assert _get(admin, "/healthz") == (200, "ok\n")  # every idle one's end is handled...
    assert "Traceback" not in sidecar.output  # ...without an error (uvloop refuses a write
    # to a connection closed for a newer one)


def test_an_admin_address_off_loopback_needs_unsafe_admin(sidecars: SidecarFactory) -> None:
    args = ["--upstream", "127.0.0.1:1", "--allow-cn", "a", "--admin", "0.0.0.0:9901",
            *sidecars.tls_args()]  # fmt: skip
    assert_config_error(sidecars, args, "--admin 0.0.0.0:9901 is not on loopback")


def test_metrics_count_connections_handshakes_and_refusals(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--admin", "127.0.0.1:0")
    admin = _admin_port(sidecar)
    route = (("route", "ingress"),)
    with sidecar.channel(pki, "alice") as alice:
        assert _code(alice) == grpc.StatusCode.OK
        assert _samples(admin, "sidecar_connections_open") == {route: 1.0}
    with sidecar.channel(pki, "mallory") as mallory:
        assert _code(mallory) == grpc.StatusCode.PERMISSION_DENIED
    with sidecar.channel(pki, "stranger") as stranger:  # another CA: its handshake fails
        assert _code(stranger) == grpc.StatusCode.UNAVAILABLE
    sidecar.wait_for("TLS handshake with .* failed")

    def refused(reason: str) -> tuple[tuple[str, str], ...]:
        return (("reason", reason), ("route", "ingress"))

    wait_until(lambda: _samples(admin, "sidecar_connections_open") == {route: 0.0})
    assert _samples(admin, "sidecar_connections_accepted_total")[route] >= 3
    refusals = _samples(admin, "sidecar_connections_refused_total")
    assert refusals[refused("denied")] == 1 and refusals[refused("handshake")] >= 1, refusals
    assert refusals[refused("limit")] == 0
    assert _samples(admin, "sidecar_tls_handshake_duration_seconds_count")[route] == 2


def test_sidecar_probe_says_why_in_one_line(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    env = {key: value for key, value in os.environ.items() if key != "SIDECAR_ADMIN"}
    missing = subprocess.run([sys.executable, "-m", "sidecar", "probe", "/readyz"],
                             env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert missing.returncode == 2 and "give the admin listener's address" in missing.stderr
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{unused.getsockname()[1]}"
    result = sidecars.run("probe", "--admin", nobody, "/healthz")
    assert result.returncode == 1 and "no answer" in result.stderr, result.stderr
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--admin", "127.0.0.1:0")
    admin = f"127.0.0.1:{_admin_port(sidecar)}"
    assert sidecars.run("probe", "--admin", admin, "/healthz").returncode == 0
    probe.stop()
    wait_until(lambda: sidecars.run("probe", "--admin", admin, "/readyz").returncode == 1)
    answer = sidecars.run("probe", "--admin", admin, "/readyz").stderr
    assert answer.startswith("sidecar probe: /readyz: 503:") and len(answer.splitlines()) == 1


def test_an_admin_unix_socket_replaces_a_stale_one_and_is_removed_at_exit(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    path = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # a previous run's, left behind
        stale.bind(str(path))
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--admin", f"unix:{path}")
    sidecar.wait_for(f"admin: .* served at unix:{path}")
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(path))
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.1 200 OK")
    sidecar.signal(signal.SIGTERM)
    assert sidecar.wait_exit() == 0
    assert not path.exists()


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_metrics_count_denials_by_rule_and_upstream_failures_by_kind(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{probe.port}",
        "cert": str(pki.cert("server")), "key": str(pki.key("server")),
        "ca": str(pki.dir / "ca.pem"), "data_plane": data_plane, "admin": "127.0.0.1:0",
        "rules": [
            {"name": "no-streams", "action": "deny", "cn": ["alice"],
             "methods": ["/probe.Probe/ServerStream"]},
            {"action": "allow", "cn": ["alice"], "methods": ["*"]},
        ],
    }))  # fmt: skip
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    admin = _admin_port(sidecar)
    with sidecar.channel(pki, "alice") as alice:
        assert _code(alice) == grpc.StatusCode.OK
        with pytest.raises(grpc.RpcError) as denied:
            list(alice.unary_stream("/probe.Probe/ServerStream")(b"x", timeout=10))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with sidecar.channel(pki, "mallory") as mallory:
        assert _code(mallory) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(mallory) == grpc.StatusCode.PERMISSION_DENIED
    probe.stop()
    with sidecar.channel(pki, "alice") as alice:
        assert _code(alice) == grpc.StatusCode.UNAVAILABLE

    def rule(name: str) -> tuple[tuple[str, str], ...]:
        return (("route", "ingress"), ("rule", name))

    expected = {rule("rule 'no-streams'"): 1.0, rule("no rule matched"): 2.0}
    wait_until(lambda: _samples(admin, "sidecar_denials_total") == expected)
    failures = _samples(admin, "sidecar_upstream_failures_total")
    assert failures.get((("kind", "refused"), ("route", "ingress")), 0) >= 1, failures


def test_metrics_and_json_logs_tell_handshake_failures_by_kind(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--admin", "127.0.0.1:0",
                               "--log-format", "json")  # fmt: skip
    admin = int(sidecar.wait_for(r"admin: .* served at 127\.0\.0\.1:(\d+)").group(1))
    for client, kind in (("stranger", "unknown_ca"), (None, "no_certificate"),
                         ("expired", "expired")):  # fmt: skip
        with sidecar.channel(pki, client) as channel:
            assert _code(channel) == grpc.StatusCode.UNAVAILABLE
        sidecar.wait_for(rf'"event": "handshake_failed", "remote": "ipv4:127\.0\.0\.1:\d+", '
                         rf'"kind": "{kind}", "reason": "[^"]+"')  # fmt: skip
    with socket.create_connection(("127.0.0.1", sidecar.port)) as plain:  # not TLS at all
        plain.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        plain.recv(1024)
    # A client that does not trust the sidecar's CA: OpenSSL's says so with an alert
    # (grpcio's closes the connection without one: counted as `closed`).
    distrustful = ssl.create_default_context(cafile=str(pki.dir / "other-ca.pem"))
    distrustful.load_cert_chain(pki.cert("alice"), pki.key("alice"))
    raw = socket.create_connection(("127.0.0.1", sidecar.port))
    with raw, pytest.raises(ssl.SSLCertVerificationError):
        distrustful.wrap_socket(raw, server_hostname="localhost")
    kinds = ("unknown_ca", "no_certificate", "expired", "protocol", "rejected_by_caller")
    expected = {kind: 1.0 for kind in kinds}

    def failures() -> dict[str, float]:
        found = _samples(admin, "sidecar_tls_handshake_failures_total")
        return {dict(labels)["kind"]: value for labels, value in found.items()}

    wait_until(lambda: failures() == expected)


def test_debug_logs_say_when_each_connection_opens_and_closes(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--log-level", "debug")
    with sidecar.channel(pki, "alice") as alice:
        assert _code(alice) == grpc.StatusCode.OK
        assert _code(alice) == grpc.StatusCode.OK
    with sidecar.channel(pki, "mallory") as mallory:
        assert _code(mallory) == grpc.StatusCode.PERMISSION_DENIED
    sidecar.wait_for(r"connection from ipv4:127\.0\.0\.1:\d+ opened: peer CN=alice, spliced")
    sidecar.wait_for(r"connection from ipv4:127\.0\.0\.1:\d+ closed after [\d.e-]+s, 2 calls")
    sidecar.wait_for(
        r"connection from ipv4:127\.0\.0\.1:\d+ opened: peer CN=mallory, refused \(denied\)"
    )
    sidecar.wait_for(r"connection from ipv4:127\.0\.0\.1:\d+ closed after [\d.e-]+s, 1 calls")


def test_calls_by_caller_are_counted_when_asked_and_bounded(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--allow-cn", "carol",
                               "--admin", "127.0.0.1:0", "--metrics-callers", "1")  # fmt: skip
    admin = _admin_port(sidecar)
    for client in ("alice", "carol", "mallory"):
        with sidecar.channel(pki, client) as channel:
            _code(channel)

    def key(caller: str, code: str) -> tuple[tuple[str, str], ...]:
        return (("caller", caller), ("code", code), ("route", "ingress"))

    expected = {key("CN=alice", "OK"): 1.0, key("other", "OK"): 1.0,
                key("other", "PERMISSION_DENIED"): 1.0}  # fmt: skip
    wait_until(lambda: _samples(admin, "sidecar_calls_by_caller_total") == expected)
    wait_until(lambda: _samples(admin, "sidecar_connections_closed_total") == {
        (("route", "ingress"),): 3.0})  # fmt: skip
    without = sidecars.serving(probe.port, "--allow-cn", "alice", "--admin", "127.0.0.1:0")
    assert _samples(_admin_port(without), "sidecar_calls_by_caller_total") == {}  # off
