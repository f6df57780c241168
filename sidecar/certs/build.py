"""Build X.509 certificates in-process: CAs and server/client leaves, done right.

EC P-256 by default (RSA on request), random serials, timezone-aware validity,
critical BasicConstraints and KeyUsage, SKI/AKI, extended key usages and SANs on
every leaf; no certificate outlives its issuer. Tests use this module to make
their PKI; the `sidecar certs` command is a thin layer over it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from sidecar.pki.x509 import ROLE_EKU, Role

KeyType = Literal["ec", "rsa"]
Usage = Literal["server", "client", "both"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Backdating absorbs clock skew between the issuer and the verifier.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, with PEM encodings ready to write or pass to grpc."""

    certificate: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write NAME.pem and NAME.key (0600) into directory; return both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{name}.pem"
        key_path = directory / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        write_private(key_path, self.key_pem)
        return cert_path, key_path


def write_private(path: Path, data: bytes) -> None:
    """Write data to path readable by the owner only, never world-readable even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600)


def new_key(key_type: KeyType = "ec", rsa_bits: int = 2048) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if rsa_bits not in (2048, 3072, 4096):
        raise ValueError(f"RSA key size must be 2048, 3072 or 4096, not {rsa_bits}")
    return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)


def _validity(
    days: int, not_before: datetime.datetime | None, issuer: x509.Certificate | None
) -> tuple[datetime.datetime, datetime.datetime]:
    start = not_before or datetime.datetime.now(datetime.timezone.utc) - _BACKDATE
    end = start + datetime.timedelta(days=days)
    if issuer is not None:
        # A chain is only as valid as its shortest-lived link; ending with the issuer
        # keeps what the certificate says true.
        end = min(end, issuer.not_valid_after_utc)
    if end <= start:
        raise ValueError(f"validity would end ({end:%Y-%m-%d}) before it starts")
    return start, end


def _authority_key_id(issuer: Issued) -> x509.AuthorityKeyIdentifier:
    """AKI equal to the issuer's own SKI, so path builders match them byte for byte.

    An issuer made elsewhere may compute its SKI another way than from_public_key.
    """
    try:
        ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: PrivateKey,
    validity: tuple[datetime.datetime, datetime.datetime],
    *,
    ca: bool,
    path_length: int | None = None,
) -> x509.CertificateBuilder:
    """What every certificate made here carries: random serial, critical BasicConstraints
    and KeyUsage, SKI. A CA signs certificates and CRLs; a leaf signs handshakes and,
    with an RSA key, may encipher (RSA key exchange)."""
    start, end = validity
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not ca and isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def init_ca(
    name: str = "sidecar Root CA",
    *,
    days: int = 3650,
    key_type: KeyType = "ec",
    rsa_bits: int = 2048,
    parent: Issued | None = None,
    path_length: int | Literal["auto"] | None = "auto",
    not_before: datetime.datetime | None = None,
) -> Issued:
    """Make a root CA, or an intermediate CA signed by parent.

    path_length caps how many CAs may follow this one in a chain; "auto" means
    unlimited for a root and 0 for an intermediate (it signs leaves only).
    """
    if path_length == "auto":
        path_length = 0 if parent else None
    key = new_key(key_type, rsa_bits)
    validity = _validity(days, not_before, parent.certificate if parent else None)
    subject = _name(name)
    issuer_name = parent.certificate.subject if parent else subject
    signing_key = parent.key if parent else key
    builder = _builder(subject, issuer_name, key, validity, ca=True, path_length=path_length)
    if parent:
        builder = builder.add_extension(_authority_key_id(parent), critical=False)
    return Issued(builder.sign(signing_key, hashes.SHA256()), key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    usage: Usage = "both",
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
    days: int = 365,
    key_type: KeyType = "ec",
    rsa_bits: int = 2048,
    not_before: datetime.datetime | None = None,
    cn_as_dns: bool | None = None,
    extended_key_usages: Sequence[x509.ObjectIdentifier] | None = None,
) -> Issued:
    """Issue a leaf certificate signed by ca.

    SANs are always present: for server certificates the CN is added as a DNS SAN
    unless cn_as_dns is False (modern verifiers ignore the CN). extended_key_usages
    overrides the usages implied by `usage` (tests use it to build wrong-EKU certs).
    """
    key = new_key(key_type, rsa_bits)
    validity = _validity(days, not_before, ca.certificate)
    if cn_as_dns is None:
        cn_as_dns = usage in ("server", "both")
    dns_names = list(dns)
    if cn_as_dns and common_name not in dns_names:
        dns_names.insert(0, common_name)
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    sans += [x509.UniformResourceIdentifier(uri) for uri in uris]
    if extended_key_usages is None:
        roles: list[Role] = ["server", "client"] if usage == "both" else [usage]
        extended_key_usages = [ROLE_EKU[role] for role in roles]
    builder = _builder(_name(common_name), ca.certificate.subject, key, validity, ca=False)
    builder = builder.add_extension(_authority_key_id(ca), critical=False)
    if extended_key_usages:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(extended_key_usages)), critical=False
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def make_crl(
    ca: Issued,
    revoked: Mapping[int, datetime.datetime],
    *,
    number: int,
    days: int = 7,
    kept: Sequence[x509.RevokedCertificate] = (),
    now: datetime.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A complete CRL of ca revoking the serials in revoked (with their revocation dates)
    and the entries of an earlier CRL in kept (as they are: reasons kept), current for
    days: its nextUpdate, past which a sidecar calls it stale."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
    )
    for entry in kept:
        builder = builder.add_revoked_certificate(entry)
    listed = {entry.serial_number for entry in kept}
    for serial, when in sorted(revoked.items()):
        if serial not in listed:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
    return builder.sign(ca.key, hashes.SHA256())
