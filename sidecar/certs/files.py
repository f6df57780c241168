"""Read certificates, keys and CAs from files for `sidecar certs`, with one-line errors.

Every failure is a ConfigError that names the file (and the flag, when the caller
gives one): a missing file, a file with no certificate in it, a CA key that does
not belong to the CA certificate, a "CA" that may not sign. Checking all of that
before signing anything means no half-written output and no bad chain.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.certs.build import Issued
from sidecar.errors import ConfigError

PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_CHAIN = "ca-chain.pem"  # an intermediate CA's own certificate, then the CAs above it


def read_bytes(path: Path, what: str) -> bytes:
    """The file's bytes, or a ConfigError saying `what: no such file: PATH` and the like."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: {path} is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{what}: cannot read {path}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None


def load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    """Every PEM certificate in the file, in order (at least one)."""
    data = read_bytes(path, what)
    if PEM_CERTIFICATE not in data:
        raise ConfigError(f"{what}: {path} holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{what}: {path} is not a valid PEM certificate ({exc})") from None


def load_private_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    """An unencrypted EC or RSA private key: the key types this package signs with."""
    data = read_bytes(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "needs a password"
        raise ConfigError(f"{what}: {path} is encrypted; give an unencrypted key") from None
    except ValueError:  # never echo the parser's detail: it may quote key bytes
        raise ConfigError(f"{what}: {path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{what}: {path}: only EC and RSA keys can sign here")
    return key


def is_self_signed(cert: x509.Certificate) -> bool:
    """True for a root: issued by itself and signed by its own key."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def public_key_matches(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> bool:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


@dataclass(frozen=True)
class Authority:
    """A CA that can sign, and the chain a leaf it signs should be served with."""

    issued: Issued
    cert_path: Path
    # The CA's own certificate then the CAs above it, the self-signed root left out
    # (a peer must already trust the root); empty when the CA is itself the root.
    intermediates: tuple[x509.Certificate, ...]

    @property
    def certificate(self) -> x509.Certificate:
        return self.issued.certificate

    @property
    def is_root(self) -> bool:
        return not self.intermediates

    @property
    def path_length(self) -> int | None:
        return self.certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value.path_length


def load_authority(
    cert_path: Path,
    key_path: Path,
    *,
    chain_path: Path | None = None,
    what: str = "CA",
    now: datetime.datetime | None = None,
) -> Authority:
    """Load a CA certificate (optionally followed by the CAs above it) and its key.

    Refused with a ConfigError: a certificate that is not a CA or may not sign
    certificates, a key that is not its key, a CA that has expired.
    """
    found = load_certificates(cert_path, f"{what} certificate")
    if chain_path is not None and chain_path.exists():
        found += load_certificates(chain_path, f"{what} chain")
    ca = found[0]
    key = load_private_key(key_path, f"{what} key")
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(f"{what} certificate: {cert_path} is not a CA certificate")
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise ConfigError(
            f"{what} certificate: {cert_path} may not sign certificates (keyCertSign)"
        )
    if not public_key_matches(ca, key):
        raise ConfigError(f"{what} key: {key_path} does not match {what} certificate {cert_path}")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if ca.not_valid_after_utc < now:
        expired = f"{ca.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        raise ConfigError(f"{what} certificate: {cert_path} expired on {expired}")
    intermediates = _unique(cert for cert in found if not is_self_signed(cert))
    return Authority(Issued(ca, key), cert_path, intermediates)


def load_ca_dir(directory: Path, what: str = "--ca") -> Authority:
    """The CA that `sidecar certs init-ca --out DIRECTORY` wrote."""
    if not directory.exists():
        raise ConfigError(f"{what}: no such directory: {directory}")
    if not directory.is_dir():
        raise ConfigError(f"{what}: {directory} is not a directory (give the init-ca --out DIR)")
    for name in (CA_CERT, CA_KEY):
        if not (directory / name).exists():
            raise ConfigError(f"{what}: {directory} holds no {name} (make one with init-ca)")
    return load_authority(
        directory / CA_CERT, directory / CA_KEY, chain_path=directory / CA_CHAIN, what=what
    )


def _unique(certs: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: list[x509.Certificate] = []
    for cert in certs:
        if cert not in seen:
            seen.append(cert)
    return tuple(seen)
