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

from sidecar.certs.build import Issued, PrivateKey
from sidecar.certs.verify import is_self_signed, utc
from sidecar.config.pem import read_bytes
from sidecar.errors import ConfigError
from sidecar.pki.x509 import (
    is_ca,
    parse_certificates,
    parse_private_key,
    public_key_matches,
)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_CHAIN = "ca-chain.pem"  # an intermediate CA's own certificate, then the CAs above it


def load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    """Every PEM certificate in the file, in order (at least one)."""
    return parse_certificates(read_bytes(path, what), f"{what}: {path}")


def load_private_key(path: Path, what: str) -> PrivateKey:
    """An unencrypted EC or RSA private key: the key types this package signs with."""
    key = parse_private_key(read_bytes(path, what), f"{what}: {path}")
    if not isinstance(key, PrivateKey):
        raise ConfigError(f"{what}: {path}: only EC and RSA keys can sign here")
    return key


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
    if not is_ca(ca):
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
        raise ConfigError(
            f"{what} certificate: {cert_path} expired on {utc(ca.not_valid_after_utc)}"
        )
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
