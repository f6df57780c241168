"""The caller's identity for the app: with identity_header, the app reads the caller's
verified identity in x-forwarded-client-cert (Envoy's XFCC), and a caller-supplied header of
that name never reaches it, on either data plane, whatever its encoding or framing (the
header-block fuzz in tests/fuzz/test_identity_spoof_fuzz.py covers the encodings)."""

from __future__ import annotations

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.h2.frames import CONTINUATION, DATA, END_HEADERS, END_STREAM, HEADERS
from tests.conftest import Pki, SidecarFactory, assert_config_error
from tests.hostile.peers import RawPeer, message, request_block
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"
SPOOF = ("x-forwarded-client-cert", 'Hash=00;Subject="CN=admin";URI=spiffe://example.org/admin')


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_callers_own_identity_header_never_reaches_the_app(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, data_plane: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", data_plane)
    with sidecar.channel(pki, "alice") as alice:
        unary = alice.unary_unary(UNARY)
        assert unary(b"x", timeout=10, metadata=[SPOOF, ("x-trace", "t1")]) == b"x"
    (seen,) = probe.wait_for_calls(1)
    assert ("x-trace", "t1") in seen.metadata
    assert all(key != SPOOF[0] for key, _ in seen.metadata), seen.metadata


def test_split_across_continuation_frames_it_is_still_dropped(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice")
    block = request_block(UNARY, (("x-trace", "t2"), SPOOF))
    cut = len(block) - 20  # inside the spoofed field, the block's last (its value: 58 bytes)
    with RawPeer(sidecar.port, pki, "alice") as peer:
        peer.settle()
        peer.send_frame(HEADERS, 0, 1, block[:cut])
        peer.send_frame(CONTINUATION, END_HEADERS, 1, block[cut:])
        peer.send_frame(DATA, END_STREAM, 1, message(b"y"))
        assert peer.status(1)["grpc-status"] == "0"
    (seen,) = probe.wait_for_calls(1)
    assert ("x-trace", "t2") in seen.metadata
    assert all(key != SPOOF[0] for key, _ in seen.metadata), seen.metadata


def _odd_client(pki: Pki) -> tuple[grpc.ChannelCredentials, x509.Certificate]:
    """A client certificate whose names hold every character XFCC must quote or escape."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ex;ample\\"),
        x509.NameAttribute(NameOID.COMMON_NAME, 'a"b,c;d=\u00e9'),
    ])  # fmt: skip
    sans = [
        x509.UniformResourceIdentifier("spiffe://example.org/a;b"),
        x509.UniformResourceIdentifier("spiffe://example.org/x=\\"),
        x509.DNSName("odd.example"),
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(pki.ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    credentials = grpc.ssl_channel_credentials(
        (pki.dir / "ca.pem").read_bytes(),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate.public_bytes(serialization.Encoding.PEM),
    )
    return credentials, certificate


def _hash(pki: Pki, name: str) -> str:
    certificate = x509.load_pem_x509_certificate(pki.cert(name).read_bytes())
    return certificate.fingerprint(hashes.SHA256()).hex()


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_the_app_reads_the_callers_identity_in_envoys_format(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, data_plane: str
) -> None:
    sidecar = sidecars.serving(
        probe.port, "--allow-all", "--identity-header", "--data-plane", data_plane
    )
    odd_credentials, odd = _odd_client(pki)
    for client in ("alice", "carol"):
        with sidecar.channel(pki, client) as channel:
            # The caller's own header is dropped; the sidecar's is the only one.
            channel.unary_unary(UNARY)(b"x", timeout=10, metadata=[SPOOF])
    with grpc.secure_channel(f"127.0.0.1:{sidecar.port}", odd_credentials) as channel:
        channel.unary_unary(UNARY)(b"x", timeout=10)
    seen = [
        [value for key, value in call.metadata if key == SPOOF[0]]
        for call in probe.wait_for_calls(3)
    ]
    odd_hash = odd.fingerprint(hashes.SHA256()).hex()
    assert seen == [
        [f'Hash={_hash(pki, "alice")};Subject="CN=alice"'],
        [
            f'Hash={_hash(pki, "carol")};Subject="CN=carol";'
            "URI=spiffe://example.org/ns/prod/sa/carol;DNS=carol.svc.example.org"
        ],
        [
            f"Hash={odd_hash};"
            # RFC 4514 escapes " , ; and \, the e-acute is written as its UTF-8 bytes (\xx
            # each), an escaped quote or backslash as RFC 4514's hex pair (\22, \5c), a
            # backslash outside the subject as \5c: none stands before a quote.
            r'Subject="CN=a\22b\,c\;d=\c3\a9,O=Ex\;ample\5c";'
            r'URI="spiffe://example.org/a;b";URI="spiffe://example.org/x=\5c";'
            "DNS=odd.example"
        ],
    ], seen


def test_identity_header_is_for_ingress_routes_only(sidecars: SidecarFactory, pki: Pki) -> None:
    args = ["--mode", "egress", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
            "--identity-header", *sidecars.tls_args()]  # fmt: skip
    assert_config_error(sidecars, args, "--identity-header applies to ingress routes only")
