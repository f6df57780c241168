"""`sidecar certs inspect`: describe the certificates and keys in a file, as text lines.

A file may hold several PEM blocks (a chain, or a certificate with its key); each
is described in order. Private keys are described by type and public-key
fingerprint only: their secret part is never formatted, so it cannot be printed.
"""

from __future__ import annotations

import datetime
import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from sidecar.certs.verify import is_self_signed, utc
from sidecar.errors import ConfigError
from sidecar.pki.x509 import eku_name, pem_blocks, san_names, spki

_PRIVATE_KEYS = {b"PRIVATE KEY", b"EC PRIVATE KEY", b"RSA PRIVATE KEY"}
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_KEY_USAGES = [
    ("digital_signature", "digitalSignature"),
    ("content_commitment", "nonRepudiation"),
    ("key_encipherment", "keyEncipherment"),
    ("data_encipherment", "dataEncipherment"),
    ("key_agreement", "keyAgreement"),
    ("key_cert_sign", "keyCertSign"),
    ("crl_sign", "cRLSign"),
]
_WIDTH = 22  # label column: fits "SHA-256 fingerprint:"


def colon_hex(data: bytes) -> str:
    """AB:CD:... as openssl prints fingerprints."""
    return ":".join(f"{byte:02X}" for byte in data)


def key_description(key: object) -> str:
    """EC P-256, RSA 2048, Ed25519 ...: what a public or private key is."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"EC {_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return "Ed448"
    return type(key).__name__


def public_key_fingerprint(public_key: PublicKeyTypes) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo: equal for a certificate and its key."""
    return colon_hex(hashlib.sha256(spki(public_key)).digest())


def _line(label: str, value: str) -> str:
    return f"  {label + ':':<{_WIDTH}}{value}"


def _extension(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _kind(cert: x509.Certificate) -> str:
    ext = _extension(cert, x509.BasicConstraints)
    if ext is None or not isinstance(ext.value, x509.BasicConstraints) or not ext.value.ca:
        return "leaf" + ("" if ext else " (no BasicConstraints)")
    limit = ext.value.path_length
    depth = "unlimited" if limit is None else str(limit)
    root = "root " if is_self_signed(cert) else "intermediate "
    return f"{root}CA (path length {depth})" + (
        "" if ext.critical else ", BasicConstraints not critical"
    )


def _key_usage(cert: x509.Certificate) -> str:
    ext = _extension(cert, x509.KeyUsage)
    if ext is None or not isinstance(ext.value, x509.KeyUsage):
        return "(none)"
    usage = ext.value
    names = [name for attr, name in _KEY_USAGES if getattr(usage, attr)]
    if usage.key_agreement:  # encipher/decipher_only are defined only with keyAgreement
        names += [
            n
            for a, n in (("encipher_only", "encipherOnly"), ("decipher_only", "decipherOnly"))
            if getattr(usage, a)
        ]
    return ", ".join(names) + (" (critical)" if ext.critical else "")


def _ekus(cert: x509.Certificate) -> str:
    ext = _extension(cert, x509.ExtendedKeyUsage)
    if ext is None or not isinstance(ext.value, x509.ExtendedKeyUsage):
        return "(none: any usage)"
    return ", ".join(eku_name(oid) for oid in ext.value)


def describe_certificate(cert: x509.Certificate, now: datetime.datetime) -> list[str]:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    issuer = cert.issuer.rfc4514_string() + (" (self-signed)" if is_self_signed(cert) else "")
    serial = f"{cert.serial_number:x}"
    serial = ":".join(re.findall("..", serial.zfill(len(serial) + len(serial) % 2)))
    return [
        _line("subject", cert.subject.rfc4514_string()),
        _line("SANs", ", ".join(san_names(cert)) or "(none)"),
        _line("issuer", issuer),
        _line("serial", serial),
        _line("not before", utc(start) + (" (not yet valid)" if now < start else "")),
        _line("not after", utc(end) + (" (expired)" if now > end else "")),
        _line("kind", _kind(cert)),
        _line("key", key_description(cert.public_key())),
        _line("key usage", _key_usage(cert)),
        _line("extended key usage", _ekus(cert)),
        _line("SHA-256 fingerprint", colon_hex(cert.fingerprint(hashes.SHA256()))),
        _line("public key SHA-256", public_key_fingerprint(cert.public_key())),
    ]


def _describe_block(label: bytes, block: bytes, now: datetime.datetime) -> list[str]:
    if label == b"CERTIFICATE":
        return describe_certificate(x509.load_pem_x509_certificate(block), now)
    if label in _PRIVATE_KEYS:
        try:
            key = serialization.load_pem_private_key(block, password=None)
        except TypeError:  # a legacy PEM with a Proc-Type: ENCRYPTED header
            return [_line("private key", "encrypted (not decrypted, not shown)")]
        return [
            _line("private key", f"{key_description(key)} (secret part not shown)"),
            _line("public key SHA-256", public_key_fingerprint(key.public_key())),
        ]
    if label == b"ENCRYPTED PRIVATE KEY":
        return [_line("private key", "encrypted (not decrypted, not shown)")]
    if label == b"PUBLIC KEY":
        public = serialization.load_pem_public_key(block)
        return [
            _line("public key", key_description(public)),
            _line("public key SHA-256", public_key_fingerprint(public)),
        ]
    return [_line("PEM block", f"{label.decode()} (not described)")]


def describe(data: bytes, source: str, now: datetime.datetime | None = None) -> list[str]:
    """Lines describing every PEM block in data (or one DER certificate)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    blocks = pem_blocks(data)
    if not blocks:
        try:
            return [
                f"{source} [certificate, DER]",
                *describe_certificate(x509.load_der_x509_certificate(data), now),
            ]
        except ValueError:
            raise ConfigError(
                f"{source}: holds no PEM block and is not a DER certificate"
            ) from None
    lines: list[str] = []
    for number, (label, block) in enumerate(blocks, 1):
        what = "private key" if label in _PRIVATE_KEYS else label.decode().lower()
        lines.append(f"{source} [{number}/{len(blocks)}: {what}]")
        try:
            lines += _describe_block(label, block, now)
        except (ValueError, TypeError):  # never echo the parser's detail: it may quote key bytes
            raise ConfigError(
                f"{source}: PEM block {number} ({label.decode()}) is not valid"
            ) from None
    return lines
