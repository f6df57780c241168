"""The listener speaks mutual TLS only, and the allowlist decides every call.

The negative matrix asserts what a refused client sees and that nothing reached
the upstream.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import grpc
import pytest

from sidecar import certs
from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"


def call(
    process: SidecarProcess, pki: Pki, client: str | None, **kwargs: str
) -> grpc.RpcError | bytes:
    with process.channel(pki, client, **kwargs) as channel:
        try:
            return bytes(channel.unary_unary(UNARY)(b"hello", timeout=10))
        except grpc.RpcError as error:
            return error


@pytest.mark.parametrize(
    ("client", "key_of"),
    [
        pytest.param(None, None, id="no-client-certificate"),
        pytest.param("stranger", None, id="certificate-from-another-ca"),
        pytest.param("expired", None, id="expired-certificate"),
        pytest.param("notyet", None, id="not-yet-valid-certificate"),
        pytest.param("server-eku", None, id="certificate-without-clientAuth-usage"),
        pytest.param("alice", "mallory", id="key-not-matching-certificate"),
    ],
)
def test_handshake_refuses_client_and_nothing_reaches_upstream(
    sidecar: SidecarProcess, pki: Pki, probe: Probe, client: str | None, key_of: str | None
) -> None:
    outcome = call(sidecar, pki, client, **({"key_of": key_of} if key_of else {}))
    assert isinstance(outcome, grpc.RpcError)
    # A TLS 1.3 client finishes its side before the server rejects its certificate: it
    # reads the alert after its handshake (grpc core: "Unwrap failed"), UNAVAILABLE.
    assert outcome.code() == grpc.StatusCode.UNAVAILABLE
    assert probe.calls == []
    assert call(sidecar, pki, "alice") == b"hello", "the sidecar must keep serving others"


def test_denied_cn_gets_permission_denied_naming_identity_and_method(
    sidecar: SidecarProcess, pki: Pki, probe: Probe
) -> None:
    outcome = call(sidecar, pki, "mallory")
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.PERMISSION_DENIED
    assert outcome.details() == f"peer CN=mallory is not allowed to call {UNARY}"
    assert probe.calls == [], "a denied call must never reach the upstream"
    sidecar.wait_for(rf"WARNING .*denied: peer CN=mallory is not allowed to call {UNARY}")


def test_denied_san_gets_permission_denied_listing_the_sans(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    process = sidecars.serving(probe.port, "--allow-dns", "*.other.example.org")
    outcome = call(process, pki, "carol")
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.PERMISSION_DENIED
    assert outcome.details() == (
        "peer CN=carol, DNS=carol.svc.example.org, URI=spiffe://example.org/ns/prod/sa/carol "
        f"is not allowed to call {UNARY}"
    )
    assert probe.calls == []


@pytest.mark.parametrize(
    "rule",
    [
        ["--allow-cn", "carol"],
        ["--allow-cn", "car*"],
        ["--allow-dns", "carol.svc.example.org"],
        ["--allow-dns", "*.svc.example.org"],
        ["--allow-dns", "**.example.org"],
        ["--allow-dns", "CAROL.SVC.EXAMPLE.ORG"],
        ["--allow-uri", "spiffe://example.org/ns/prod/sa/carol"],
        ["--allow-uri", "spiffe://example.org/ns/*/sa/carol"],
        ["--allow-uri", "spiffe://example.org/**"],
        ["--allow-cn", "nobody", "--allow-uri", "spiffe://example.org/ns/prod/sa/*"],
    ],
    ids=" ".join,
)
def test_matching_rule_allows_the_caller(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, rule: list[str]
) -> None:
    process = sidecars.serving(probe.port, *rule)
    assert call(process, pki, "carol") == b"hello"
    assert call(process, pki, "mallory").code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "rule",
    [
        ["--allow-cn", "Carol"],
        ["--allow-dns", "*.example.org"],  # '*' stays within one label
        ["--allow-uri", "spiffe://example.org/*"],  # '*' stays within one path segment
        ["--allow-uri", "spiffe://example.org/ns/prod/sa/caro"],
    ],
    ids=" ".join,
)
def test_near_miss_rule_denies_the_caller(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, rule: list[str]
) -> None:
    process = sidecars.serving(probe.port, *rule)
    outcome = call(process, pki, "carol")
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.PERMISSION_DENIED


def test_allow_all_accepts_any_certificate_from_the_ca_but_still_requires_one(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    process = sidecars.serving(probe.port, "--allow-all")
    assert call(process, pki, "mallory") == b"hello"
    assert call(process, pki, None).code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]
    assert call(process, pki, "stranger").code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]


def _tls_client(pki: Pki, **settings: object) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.dir / "ca.pem")
    context.load_cert_chain(pki.cert("alice"), pki.key("alice"))
    context.set_alpn_protocols(["h2"])
    for name, value in settings.items():
        setattr(context, name, value)
    return context


def _handshake(port: int, context: ssl.SSLContext) -> tuple[str | None, str | None]:
    """Complete a TLS handshake with the listener; return (TLS version, ALPN protocol)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version(), tls.selected_alpn_protocol()


def test_listener_negotiates_alpn_h2_and_modern_tls(sidecar: SidecarProcess, pki: Pki) -> None:
    assert _handshake(sidecar.port, _tls_client(pki)) == ("TLSv1.3", "h2")


def test_listener_accepts_tls_1_2(sidecar: SidecarProcess, pki: Pki) -> None:
    context = _tls_client(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert _handshake(sidecar.port, context) == ("TLSv1.2", "h2")


def test_listener_refuses_tls_below_1_2(sidecar: SidecarProcess, pki: Pki) -> None:
    # openssl s_client can still offer TLS 1.1 when its security level allows it.
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{sidecar.port}",
            "-tls1_1",
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-cert",
            str(pki.cert("alice")),
            "-key",
            str(pki.key("alice")),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "no peer certificate available" in result.stdout  # no handshake completed
    sidecar.wait_for("UNSUPPORTED_PROTOCOL")  # refused by the listener, not the client


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def test_certificates_made_by_openssl_work(
    sidecars: SidecarFactory, probe: Probe, tmp_path: Path
) -> None:
    """Certificates from an outside tool (the openssl command) work on both ends."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=OpenSSL Test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=tmp_path,
    )
    for name, extensions in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (tmp_path / f"{name}.ext").write_text(extensions)
        _openssl(
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=openssl-{name}",
            cwd=tmp_path,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            f"{name}.pem",
            "-extfile",
            f"{name}.ext",
            cwd=tmp_path,
        )
    process = sidecars.start(
        "--upstream",
        f"127.0.0.1:{probe.port}",
        "--cert",
        str(tmp_path / "server.pem"),
        "--key",
        str(tmp_path / "server.key"),
        "--ca",
        str(tmp_path / "ca.pem"),
        "--allow-cn",
        "openssl-client",
        default_tls=False,
    )
    process.wait_ready()
    credentials = grpc.ssl_channel_credentials(
        (tmp_path / "ca.pem").read_bytes(),
        (tmp_path / "client.key").read_bytes(),
        (tmp_path / "client.pem").read_bytes(),
    )
    with grpc.secure_channel(f"127.0.0.1:{process.port}", credentials) as channel:
        assert channel.unary_unary(UNARY)(b"hello", timeout=10) == b"hello"


def _chain_sent(port: int, pki: Pki, trusted: Path) -> list[str]:
    """The subjects of the certificates the listener sends, leaf first (openssl s_client)."""
    shown = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts", "-CAfile",
         str(trusted), "-cert", str(pki.cert("alice")), "-key", str(pki.key("alice"))],
        input="", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in shown.stdout, shown.stdout
    return [line.split("s:", 1)[1] for line in shown.stdout.splitlines() if " s:" in line]


def _serve_chain(
    sidecars: SidecarFactory, probe: Probe, tmp_path: Path, chain: list[certs.Issued], ca: Path
) -> SidecarProcess:
    (tmp_path / "own.pem").write_bytes(b"".join(issued.cert_pem for issued in chain))
    (tmp_path / "own.key").write_bytes(chain[0].key_pem)
    process = sidecars.start(
        "--upstream", f"127.0.0.1:{probe.port}", "--cert", str(tmp_path / "own.pem"),
        "--key", str(tmp_path / "own.key"), "--ca", str(ca), "--allow-cn", "alice",
        default_tls=False,
    )  # fmt: skip
    process.wait_ready()
    return process


def test_the_listener_sends_its_certificate_without_the_root(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    assert _chain_sent(sidecar.port, pki, pki.dir / "ca.pem") == ["CN = localhost"]


def test_a_lone_leaf_is_sent_with_its_intermediate_from_the_ca_bundle(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """The certificate file holds the leaf only; its issuer is in --ca: callers that trust
    only the root still verify the listener (the chain is completed once, at load)."""
    intermediate = certs.init_ca("Test Intermediate", parent=pki.ca, path_length=None)
    leaf = certs.issue(intermediate, "localhost", usage="server", ips=["127.0.0.1"])
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.cert_pem + intermediate.cert_pem)
    process = _serve_chain(sidecars, probe, tmp_path, [leaf], bundle)
    assert _chain_sent(process.port, pki, pki.dir / "ca.pem") == [
        "CN = localhost", "CN = Test Intermediate"
    ]  # fmt: skip
    assert call(process, pki, "alice") == b"hello"


def test_an_own_chain_from_another_ca_than_the_callers_is_sent_as_given(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """Own certificate under its own root and intermediate; callers are checked against the
    test CA, which knows neither: the file's chain goes out whole."""
    own_root = certs.init_ca("Own Root CA")
    intermediate = certs.init_ca("Own Intermediate", parent=own_root, path_length=None)
    leaf = certs.issue(intermediate, "localhost", usage="server", ips=["127.0.0.1"])
    process = _serve_chain(sidecars, probe, tmp_path, [leaf, intermediate], pki.dir / "ca.pem")
    (tmp_path / "own-root.pem").write_bytes(own_root.cert_pem)
    assert _chain_sent(process.port, pki, tmp_path / "own-root.pem") == [
        "CN = localhost", "CN = Own Intermediate"
    ]  # fmt: skip
