"""Hostile names in CA-signed client certificates: look-alike letters, bytes that are not
UTF-8, several CNs. Each is refused cleanly on both data planes and shown escaped."""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from sidecar import certs
from sidecar.auth.identity import IdentityReader
from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"
DNS_NAME = 0x82  # GeneralName [2] IA5String
PLANES = ["splice", "grpc"]


def _der(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _cn(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def hostile_certificate(
    ca: certs.Issued, subject: x509.Name, dns_sans: tuple[bytes, ...] = ()
) -> certs.Issued:
    """A client certificate signed by `ca` whose DNS SANs are these bytes, as they are.

    cryptography refuses to build a DNSName that is not ASCII, so the SAN extension
    is written as DER by hand; the CA signs whatever it is given, as a careless or
    compromised issuing process would.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if dns_sans:
        names = b"".join(_der(DNS_NAME, name) for name in dns_sans)
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, _der(0x30, names)),
            critical=False,
        )
    return certs.Issued(builder.sign(ca.key, hashes.SHA256()), key)


# name in pki.dir -> (subject, DNS SANs as raw bytes)
HOSTILE = {
    "dotless-i": (x509.Name([_cn("intruder")]), ("adm\u0131n.example.com".encode(),)),
    "kelvin": (x509.Name([_cn("intruder")]), ("\u212aube.example.com".encode(),)),
    "ascii-upper": (x509.Name([_cn("intruder")]), (b"ADMIN.Example.COM",)),
    "not-utf8": (x509.Name([_cn("alice")]), (b"adm\xffn.example.com",)),
    # One RDN holding two CNs: DER sorts the SET, so alice comes first.
    "cn-plus-cn": (x509.Name([x509.RelativeDistinguishedName([_cn("mallory"), _cn("alice")])]), ()),
    "two-cns": (x509.Name([_cn("alice"), _cn("mallory")]), ()),
}


@pytest.fixture(scope="module")
def hostile(pki: Pki) -> Pki:
    """The test PKI, with the hostile client certificates above written beside the others."""
    for name, (subject, sans) in HOSTILE.items():
        hostile_certificate(pki.ca, subject, sans).write(pki.dir, name)
    return pki


def _der_of(pki: Pki, name: str) -> bytes:
    pem = pki.cert(name).read_bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _call(sidecar: SidecarProcess, pki: Pki, client: str) -> grpc.RpcError | None:
    with sidecar.channel(pki, client) as channel:
        try:
            channel.unary_unary(UNARY)(b"x", timeout=5)
        except grpc.RpcError as error:
            return error
    return None


def _denied(sidecar: SidecarProcess, pki: Pki, client: str) -> str:
    """The details of the PERMISSION_DENIED that `client`'s call gets."""
    error = _call(sidecar, pki, client)
    assert error is not None, f"{client} was let through"
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (error.code(), error.details())
    return str(error.details())


def _allowed(sidecar: SidecarProcess, pki: Pki, client: str) -> None:
    error = _call(sidecar, pki, client)
    assert error is None, f"{client}: {error}\nthe sidecar said:\n{sidecar.output}"


def _logged_so_far(sidecar: SidecarProcess, pki: Pki) -> list[str]:
    """The sidecar's log up to now: once alice's call is logged, every earlier line is out."""
    _allowed(sidecar, pki, "alice")
    sidecar.wait_for(rf"{UNARY} peer='CN=alice' .* code=OK")
    return list(sidecar.lines)


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize(
    ("client", "shown"),
    [("dotless-i", r"DNS=adm\u0131n.example.com"), ("kelvin", r"DNS=\u212aube.example.com")],
)
def test_look_alike_dns_san_does_not_pass_for_the_ascii_name_and_is_shown_escaped(
    sidecars: SidecarFactory, probe: Probe, hostile: Pki, plane: str, client: str, shown: str
) -> None:
    sidecar = sidecars.serving(
        probe.port,
        *("--allow-cn", "alice", "--allow-dns", "admin.example.com"),
        *("--allow-dns", "kube.example.com", "--data-plane", plane),
    )
    _allowed(sidecar, hostile, "ascii-upper")  # ASCII letters still fold (RFC 4343)
    details = _denied(sidecar, hostile, client)
    assert f"peer CN=intruder, {shown} is not allowed to call {UNARY}" == details
    lines = _logged_so_far(sidecar, hostile)
    assert any(f"denied: peer CN=intruder, {shown} is not" in line for line in lines)
    assert not any("\u0131" in line or "\u212a" in line for line in lines)
    assert len(probe.calls) == 2  # ascii-upper's and alice's: the look-alike never reached it


@pytest.mark.parametrize("plane", PLANES)
def test_san_that_is_not_utf8_is_refused_cleanly_and_logged_once(
    sidecars: SidecarFactory, probe: Probe, hostile: Pki, plane: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", plane)
    for _ in range(2):  # two connections: the certificate is read once
        details = _denied(sidecar, hostile, "not-utf8")
        assert details.startswith("peer certificate serial ")
        assert "names unreadable: " in details
    lines = _logged_so_far(sidecar, hostile)
    output = "\n".join(lines)
    assert "Traceback" not in output
    assert sum("certificate cannot be read" in line for line in lines) == 1, output
    assert sum("denied: peer certificate serial" in line for line in lines) == 2, output
    assert len(probe.calls) == 1  # alice's


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("client", ["cn-plus-cn", "two-cns"])
def test_subject_with_several_cns_matches_no_cn_rule(
    sidecars: SidecarFactory, probe: Probe, hostile: Pki, plane: str, client: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", plane)
    details = _denied(sidecar, hostile, client)
    assert details == f"peer CN=alice, CN=mallory, several CNs is not allowed to call {UNARY}"
    assert len(probe.calls) == 0


def test_reader_names_every_cn_and_keeps_none_as_the_cn() -> None:
    ca = certs.init_ca("Names CA")
    subject, _ = HOSTILE["cn-plus-cn"]
    issued = hostile_certificate(ca, subject)
    identity = IdentityReader().from_der(
        issued.certificate.public_bytes(serialization.Encoding.DER)
    )
    assert identity.common_names == ("alice", "mallory")  # DER order
    assert identity.common_name is None


@pytest.mark.parametrize(
    ("subject_der", "what"),
    [
        (_der(0x0C, b"al\xffce"), "UTF8String that is not UTF-8"),
        (_der(0x1E, b"\x00a\x00l\x00"), "BMPString of an odd length"),
        (_der(0x13, b"al*ce"), "PrintableString with '*'"),
    ],
)
def test_reader_never_raises_on_a_subject_it_cannot_decode(
    subject_der: bytes, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    ca = certs.init_ca("Names CA")
    placeholder = "zzzzz"  # replaced in the DER (same length: the signature is not checked here)
    der = hostile_certificate(ca, x509.Name([_cn(placeholder)])).certificate.public_bytes(
        serialization.Encoding.DER
    )
    der = der.replace(_der(0x0C, placeholder.encode()), subject_der)
    reader = IdentityReader()
    with caplog.at_level(logging.WARNING, "sidecar.identity"):
        first = reader.from_der(der)
        again = reader.from_der(der)
    assert first is again
    assert first.unreadable, what
    assert first.common_name is None and not first.dns_names
    assert "names unreadable: " in first.description
    assert len(caplog.records) == 1, "the same certificate is reported once"


def lax_certificate(ca: certs.Issued) -> tuple[bytes, bytes]:
    """A client certificate OpenSSL verifies but cryptography cannot load (its CN a
    PrintableString holding `_` and `@`, as lax CAs write them), PEM, and its key, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    printable = x509.NameAttribute(
        NameOID.COMMON_NAME, "svc x lax", _type=x509.name._ASN1Type.PrintableString
    )
    drafted = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([printable]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(0x5EED)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    draft = drafted.public_bytes(serialization.Encoding.DER)
    tbs = drafted.tbs_certificate_bytes.replace(b"svc x lax", b"svc_x@lax")  # same length
    algorithm_at = draft.index(drafted.tbs_certificate_bytes) + len(tbs)
    algorithm = draft[algorithm_at : algorithm_at + 2 + draft[algorithm_at + 1]]
    signature = ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
    der = _der(0x30, tbs + algorithm + _der(0x03, b"\0" + signature))
    pem = ssl.DER_cert_to_PEM_cert(der).encode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, key_pem


@pytest.mark.parametrize("plane", PLANES)
def test_a_certificate_cryptography_cannot_load_keeps_its_fingerprint_and_serial(
    sidecars: SidecarFactory, probe: Probe, pki: Pki, plane: str
) -> None:
    """Its names cannot be read, so no name rule matches it; but allow_all lets it in, and
    then deny_fingerprints and deny_serials must still refuse it, and the app's identity
    header must carry its hash (all three were empty for such a certificate)."""
    pem, key_pem = lax_certificate(pki.ca)
    with pytest.raises(ValueError):
        x509.load_pem_x509_certificate(pem)
    fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()
    credentials = grpc.ssl_channel_credentials((pki.dir / "ca.pem").read_bytes(), key_pem, pem)

    def call(sidecar: SidecarProcess) -> grpc.RpcError | None:
        with grpc.secure_channel(f"127.0.0.1:{sidecar.port}", credentials) as channel:
            try:
                channel.unary_unary(UNARY)(b"x", timeout=5)
            except grpc.RpcError as error:
                return error
        return None

    common = ("--allow-all", "--data-plane", plane)
    for flag, value, reason in (
        ("--deny-fingerprints", fingerprint, f"{fingerprint} is revoked (deny_fingerprints)"),
        ("--deny-serials", "5EED", "certificate serial 5eed is revoked (deny_serials)"),
    ):
        refusing = sidecars.serving(probe.port, *common, flag, value)
        error = call(refusing)
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        assert reason in str(error.details()), error.details()
    assert probe.calls == []
    telling = sidecars.serving(probe.port, *common, "--identity-header")
    assert call(telling) is None
    (seen,) = probe.wait_for_calls(1)
    assert ("x-forwarded-client-cert", f"Hash={fingerprint}") in seen.metadata, seen.metadata
