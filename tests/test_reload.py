"""SIGHUP: every route reads its certificate, key and CA bundle again. New handshakes get
what changed; a file that would fail the start-up checks keeps the last good credentials,
with one ERROR line in the start-up checks' words.

The sidecar runs as a process; which certificate each new connection was served is read
from the client's side of a real TLS handshake.
"""

from __future__ import annotations

import datetime
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar import certs
from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.hostile.peers import client_context
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"


def _served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial of the certificate a new connection to the sidecar is served."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _reloaded(sidecar: SidecarProcess, outcome: str) -> None:
    """SIGHUP, then wait for the reload's outcome line (one per SIGHUP: counted)."""
    before = sum(outcome in line for line in sidecar.lines)
    sidecar.signal(signal.SIGHUP)
    sidecar.wait_for_count(outcome, before + 1)


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_sighup_serves_new_certificates_and_keeps_the_last_good_ones(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    first = pki.issue_server(tmp_path)
    sidecar = sidecars.serving(
        probe.port,
        "--allow-cn", "alice", "--data-plane", data_plane,
        "--cert", str(tmp_path / "server.pem"), "--key", str(tmp_path / "server.key"),
    )  # fmt: skip
    context = client_context(pki, "alice")
    assert _served_serial(sidecar.port, context) == first
    with sidecar.channel(pki) as channel:  # a connection made before the swap
        call = channel.unary_unary(UNARY)
        assert call(b"before", timeout=10) == b"before"

        second = pki.issue_server(tmp_path)
        _reloaded(sidecar, f"credentials reloaded: certificate serial {second:x}")
        assert _served_serial(sidecar.port, context) == second
        assert call(b"after", timeout=10) == b"after"  # the established connection goes on

        # Unchanged files: nothing swapped, said so.
        _reloaded(sidecar, "credentials reloaded, unchanged")

        # A key that is not the certificate's: the ERROR names both, in the start-up words,
        # and the last good credentials serve on.
        (tmp_path / "server.key").write_bytes(pki.key("alice").read_bytes())
        _reloaded(sidecar, "credentials not reloaded, the current ones stay")
        (line,) = [line for line in sidecar.lines if "not reloaded" in line]
        assert " ERROR " in line and "--key does not match --cert" in line, line
        assert _served_serial(sidecar.port, context) == second
        assert call(b"still", timeout=10) == b"still"
    with sidecar.channel(pki) as fresh:
        assert fresh.unary_unary(UNARY)(b"new", timeout=10) == b"new"
    assert sidecar.proc.poll() is None


def test_each_kind_of_bad_credentials_keeps_the_last_good_ones_with_one_error(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """Missing, half-written, mismatched, an empty CA bundle, expired, not yet valid, the
    wrong usage: each reload is refused with one ERROR in the start-up checks' words, and
    calls (on a connection made before, and on new ones) go on with the last good ones."""
    good = pki.issue_server(tmp_path)
    cert, key, ca = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    ca.write_bytes((pki.dir / "ca.pem").read_bytes())
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice",
        "--cert", str(cert), "--key", str(key), "--ca", str(ca),
        default_tls=False,
    )  # fmt: skip
    saved = {path: path.read_bytes() for path in (cert, key, ca)}

    def use(name: str) -> None:  # one of the test PKI's certificates, with its key
        cert.write_bytes(pki.cert(name).read_bytes())
        key.write_bytes(pki.key(name).read_bytes())

    faults = [
        ("missing", lambda: key.unlink(), "--key: no such file"),
        ("half-written", lambda: cert.write_bytes(saved[cert][: len(saved[cert]) // 2]),
         "--cert: " + str(cert) + " is not a valid PEM certificate"),
        ("mismatched", lambda: key.write_bytes(pki.key("alice").read_bytes()),
         "--key does not match --cert"),
        ("empty CA bundle", lambda: ca.write_bytes(pki.cert("alice").read_bytes()),
         "holds no CA certificate"),
        ("expired", lambda: use("expired"), " expired on "),
        ("not yet valid", lambda: use("notyet"), " is not valid until "),
        ("wrong usage", lambda: use("alice"), "lacks the serverAuth extended key usage"),
        ("a key OpenSSL refuses", lambda: _weak_server(pki, cert, key),
         "--cert: OpenSSL refuses " + str(cert) + ": [SSL: EE_KEY_TOO_SMALL]"),
    ]  # fmt: skip
    context = client_context(pki, "alice")
    with sidecar.channel(pki) as established:
        call = established.unary_unary(UNARY)
        for kind, break_it, words in faults:
            break_it()
            _reloaded(sidecar, "credentials not reloaded, the current ones stay")
            line = [line for line in sidecar.lines if "not reloaded" in line][-1]
            assert " ERROR " in line and words in line, (kind, line)
            assert _served_serial(sidecar.port, context) == good, kind
            assert call(kind.encode(), timeout=10) == kind.encode()
            with sidecar.channel(pki) as fresh:
                assert fresh.unary_unary(UNARY)(b"new", timeout=10) == b"new", kind
            for path, content in saved.items():
                path.write_bytes(content)
    assert sum("not reloaded" in line for line in sidecar.lines) == len(faults)
    assert sidecar.proc.poll() is None


def _weak_server(pki: Pki, cert: Path, key: Path) -> None:
    """A server certificate for localhost with an RSA-1024 key, as an old internal CA may
    issue: every check of the sidecar's own passes, but OpenSSL's security level refuses it."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    now = datetime.datetime.now(datetime.timezone.utc)
    issued = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(pki.ca.certificate.subject)
        .public_key(weak.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=5))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(pki.ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert.write_bytes(issued.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        weak.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _kubernetes_secret(
    directory: Path, pki: Pki, version: str, *, key_of: Path | None = None
) -> int:
    """A secret volume as the kubelet writes one: files in a timestamped directory, reached
    through the `..data` symlink, which is swapped in one rename; the new serial."""
    issued = certs.issue(pki.ca, "localhost", usage="server", ips=["127.0.0.1"])
    issued.write(directory / version, "tls")
    if key_of is not None:  # a secret whose key is another certificate's
        (directory / version / "tls.key").write_bytes(key_of.read_bytes())
    swap = directory / "..data_tmp"
    swap.symlink_to(version)
    swap.replace(directory / "..data")
    for name in ("tls.pem", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(Path("..data") / name)
    return issued.certificate.serial_number


def test_reload_interval_follows_a_kubernetes_secret_swap_without_sighup(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    first = _kubernetes_secret(secret, pki, "..2026_12_01_a")
    sidecar = sidecars.serving(
        probe.port,
        "--allow-cn", "alice", "--reload-interval", "0.2",
        "--cert", str(secret / "tls.pem"), "--key", str(secret / "tls.key"),
    )  # fmt: skip
    context = client_context(pki, "alice")
    assert _served_serial(sidecar.port, context) == first

    second = _kubernetes_secret(secret, pki, "..2026_12_01_b")
    sidecar.wait_for(f"credentials reloaded: certificate serial {second:x}")
    assert _served_serial(sidecar.port, context) == second

    # A secret that fails the checks is reported, and the last good credentials stay.
    _kubernetes_secret(secret, pki, "..2026_12_01_c", key_of=pki.key("alice"))
    sidecar.wait_for("credentials not reloaded, the current ones stay: --key does not match")
    assert _served_serial(sidecar.port, context) == second
    fourth = _kubernetes_secret(secret, pki, "..2026_12_01_d")
    sidecar.wait_for(f"credentials reloaded: certificate serial {fourth:x}")
    assert _served_serial(sidecar.port, context) == fourth
    assert sum("not reloaded" in line for line in sidecar.lines) == 1, sidecar.output


def _egress_as_alice(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> tuple[SidecarProcess, SidecarProcess]:
    """An ingress allowing alice and bob, and an egress route to it presenting alice from
    tmp_path/client.pem (which a test rewrites to rotate it); both ready."""
    ingress = sidecars.serving(probe.port, "--allow-cn", "alice", "--allow-cn", "bob")
    certs.issue(pki.ca, "alice", usage="client").write(tmp_path, "client")
    egress = sidecars.start(
        "--mode", "egress", "--upstream", f"127.0.0.1:{ingress.port}",
        "--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key"),
        "--ca", str(pki.dir / "ca.pem"), "--data-plane", data_plane,
        default_tls=False,
    )  # fmt: skip
    egress.wait_ready()
    return ingress, egress


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_sighup_gives_an_egress_routes_new_connections_the_new_client_certificate(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    """Egress: connections to the remote made after the reload present the new client
    certificate; a call in flight on one made before finishes there (the remote, an ingress
    sidecar allowing both names, logs which caller each call came from)."""
    ingress, egress = _egress_as_alice(sidecars, pki, probe, tmp_path, data_plane)
    target = f"127.0.0.1:{egress.port}"
    gate = probe.gate("rotation")
    with grpc.insecure_channel(target) as before:
        call = before.unary_unary(UNARY)
        assert call(b"1", timeout=10) == b"1"
        ingress.wait_for_count("peer='CN=alice", 1)
        in_flight = call.future(b"2", timeout=60, metadata=[("x-probe-gate", "rotation")])
        probe.wait_for_calls(2)

        certs.issue(pki.ca, "bob", usage="client").write(tmp_path, "client")
        _reloaded(egress, "credentials reloaded: certificate serial")
        # Its own subchannel: grpcio would otherwise share the first channel's connection.
        fresh = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(target, options=fresh) as after:
            assert after.unary_unary(UNARY)(b"3", timeout=10) == b"3"
            ingress.wait_for_count("peer='CN=bob", 1)
        gate.set()
        assert in_flight.result() == b"2"  # made before the reload: alice's connection
        ingress.wait_for_count("peer='CN=alice", 2)


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_an_egress_call_waiting_for_its_first_message_across_a_rotation_is_relayed(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    """A client-streaming call opened before the egress route's certificate is rotated, and
    sending its first message after: it reaches the remote over the new credentials (the
    grpc plane's old channel refuses new calls once it closes)."""
    _, egress = _egress_as_alice(sidecars, pki, probe, tmp_path, data_plane)
    rotated = threading.Event()

    def requests() -> Iterator[bytes]:
        rotated.wait(30)
        yield b"after"
        yield b" rotation"

    with grpc.insecure_channel(f"127.0.0.1:{egress.port}") as channel:
        assert channel.unary_unary(UNARY)(b"warm", timeout=10) == b"warm"
        waiting = channel.stream_unary("/probe.Probe/ClientStream").future(requests(), timeout=60)
        certs.issue(pki.ca, "bob", usage="client").write(tmp_path, "client")
        _reloaded(egress, "credentials reloaded: certificate serial")
        rotated.set()
        assert waiting.result() == b"after rotation"


def test_a_certificate_near_its_end_is_warned_of_and_its_expiry_is_an_error(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """A certificate in the last third of its life (here: its last 8 seconds of a day) gets
    a WARNING at start; the moment it expires, an ERROR (it is still the one in use)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(days=1) + datetime.timedelta(seconds=8)
    issued = certs.issue(pki.ca, "localhost", usage="server", ips=["127.0.0.1"], days=1,
                         not_before=start)  # fmt: skip
    issued.write(tmp_path, "server")
    serial = f"{issued.certificate.serial_number:x}"
    sidecar = sidecars.serving(
        probe.port,
        "--allow-cn", "alice",
        "--cert", str(tmp_path / "server.pem"), "--key", str(tmp_path / "server.key"),
    )  # fmt: skip
    warning = sidecar.wait_for(f"WARNING sidecar.server: ingress: certificate serial {serial} .*")
    assert "renew it" in warning.group(0), warning.group(0)
    error = sidecar.wait_for(f"ERROR sidecar.server: ingress: certificate serial {serial} .*")
    assert "expired on" in error.group(0) and "new connections fail" in error.group(0)
