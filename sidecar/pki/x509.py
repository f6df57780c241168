"""X.509 helpers shared by the run time and the `sidecar certs` toolkit: parse, name, judge.

The run time must never import the toolkit (sidecar.certs), so what both need lives
here: PEM parsing with one-line errors, a certificate's names and extended key
usages, and the roles a certificate serves. Errors start with `where`, the
caller's words for the data (`--cert: app.pem`, `CA key: ca/ca.key`), so each
caller keeps naming its own setting or file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.errors import ConfigError

PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"

# What a certificate is for: a listener (server) or an egress route (client).
Role = Literal["server", "client"]

ROLE_EKU: dict[Role, x509.ObjectIdentifier] = {
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
}
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


_BEGIN, _END, _DASHES = b"-----BEGIN ", b"-----END ", b"-----"
_LONGEST_LABEL = 64


def pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every complete PEM block in data, as (label, block), in order: `-----BEGIN LABEL-----`
    through the next `-----END `, when that END is its label's (else the BEGIN is skipped,
    as OpenSSL's reader skips it). In time linear in len(data), whatever it holds: the
    BEGIN and END lines are each searched for once, front to back (a file of nothing but
    BEGIN lines took a backtracking regular expression hours)."""
    blocks: list[tuple[bytes, bytes]] = []
    position = 0
    end_at = -1  # the first END line at or after the BEGIN being read, once searched for
    while (start := data.find(_BEGIN, position)) != -1:
        position = start + len(_BEGIN)
        label_end = data.find(_DASHES, position, position + _LONGEST_LABEL + len(_DASHES))
        if label_end == -1:
            continue
        if end_at < label_end:
            end_at = data.find(_END, label_end)
            if end_at == -1:
                break  # no END after this BEGIN: none after any later one either
        label = data[position:label_end]
        end = _END + label + _DASHES
        if data.startswith(end, end_at):
            blocks.append((label, data[start : end_at + len(end)]))
            position = end_at + len(end)
    return blocks


def eku_name(oid: x509.ObjectIdentifier) -> str:
    """The usage's name as openssl writes it (serverAuth), or its dotted OID if unknown."""
    return _EKU_NAMES.get(oid, oid.dotted_string)


def eku_allows(usages: Iterable[x509.ObjectIdentifier], role: Role) -> bool:
    """True if an extended key usage extension listing usages lets a certificate act in role."""
    found = set(usages)
    return ROLE_EKU[role] in found or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in found


def parse_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    """Every PEM certificate in data, in order (at least one)."""
    if PEM_CERTIFICATE not in data:
        raise ConfigError(f"{where} holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{where} is not a valid PEM certificate ({exc})") from None


def parse_private_key(data: bytes, where: str) -> PrivateKeyTypes:
    """An unencrypted PEM private key of any type: each caller refuses the types it cannot use."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "needs a password"
        raise ConfigError(f"{where} is encrypted; give an unencrypted key") from None
    except ValueError:  # never echo the parser's detail: it may quote key bytes
        raise ConfigError(f"{where} is not a PEM private key") from None


def spki(public_key: PublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo: equal for a certificate and its private key."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_matches(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    """True if key is the private key of cert."""
    return spki(cert.public_key()) == spki(key.public_key())


def is_ca(cert: x509.Certificate) -> bool:
    """True if cert has BasicConstraints CA:TRUE (without the extension it is no CA)."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def pem_bundle(certificates: Iterable[x509.Certificate]) -> bytes:
    """The certificates as concatenated PEM, in order: a chain file, a CA bundle."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


def san_names(cert: x509.Certificate) -> list[str]:
    """The certificate's DNS, IP and URI SANs, written `DNS:x`, `IP:y`, `URI:z`."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return (
        [f"DNS:{name}" for name in sans.get_values_for_type(x509.DNSName)]
        + [f"IP:{ip}" for ip in sans.get_values_for_type(x509.IPAddress)]
        + [f"URI:{uri}" for uri in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    )


def describe_names(cert: x509.Certificate) -> str:
    """Who a certificate names, for a log line: its subject, and its SPIFFE ID if it has one
    (an X.509-SVID's subject may say nothing)."""
    subject = cert.subject.rfc4514_string() or "no subject"
    spiffe_ids = [name[4:] for name in san_names(cert) if name.startswith("URI:spiffe://")]
    return f"{subject}, {spiffe_ids[0]}" if spiffe_ids else subject


def server_subject(server_name: str) -> x509.DNSName | x509.IPAddress:
    """The SAN a server dialled as server_name must carry: an IP address, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        return x509.DNSName(server_name.rstrip(".").lower())


def _dns_matches(pattern: str, name: str) -> bool:
    # RFC 6125: a wildcard stands for exactly one whole left-most label.
    pattern, name = pattern.rstrip(".").lower(), name.rstrip(".").lower()
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def name_matches(cert: x509.Certificate, server_name: str) -> bool:
    """True if a SAN of cert covers server_name (DNS with wildcards, or an IP); CN is not used."""
    subject = server_subject(server_name)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if isinstance(subject, x509.IPAddress):
        return subject.value in sans.get_values_for_type(x509.IPAddress)
    return any(_dns_matches(p, subject.value) for p in sans.get_values_for_type(x509.DNSName))
