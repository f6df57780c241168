"""Who is calling: the caller's identity, read from the client certificate of the connection.

The TLS layer (Python's ssl on the spliced data plane, grpc core on the per-call
one) has already verified the chain; this module only names the caller. The
certificate is parsed once and cached by its bytes, so each further connection or
call costs a dictionary lookup, and SAN types (DNS, URI, IP) are told apart
exactly rather than guessed from core's flattened string list.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

_CACHE_SIZE = 4096


@dataclass(frozen=True)
class PeerIdentity:
    """The names a verified client certificate carries."""

    common_name: str | None
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    serial: str = ""
    fingerprint_sha256: str = ""

    @property
    def spiffe_id(self) -> str | None:
        """The SPIFFE ID (the spiffe:// URI SAN), if the certificate is an X.509-SVID."""
        return next((uri for uri in self.uris if uri.startswith("spiffe://")), None)

    @functools.cached_property  # computed once per certificate: the relay logs it on every call
    def description(self) -> str:
        """Short human form for logs and denial messages, e.g. `CN=alice, DNS=alice.example`."""
        parts = []
        if self.common_name is not None:
            parts.append(f"CN={self.common_name}")
        parts += [f"DNS={name}" for name in self.dns_names]
        parts += [f"URI={uri}" for uri in self.uris]
        parts += [f"IP={ip}" for ip in self.ip_addresses]
        return ", ".join(parts) if parts else f"certificate serial {self.serial}"


def identity_from_certificate(certificate: x509.Certificate) -> PeerIdentity:
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = common_names[0].value if common_names else None
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    return PeerIdentity(
        common_name=common_name if isinstance(common_name, str) else None,
        dns_names=tuple(sans.get_values_for_type(x509.DNSName)),
        uris=tuple(sans.get_values_for_type(x509.UniformResourceIdentifier)),
        ip_addresses=tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
        serial=format(certificate.serial_number, "x"),
        fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
    )


def _identity_from_core_names(auth_context: Mapping[str, Sequence[bytes]]) -> PeerIdentity:
    """Fallback when core gave no PEM: classify core's SAN strings as best we can."""
    sans = [value.decode() for value in auth_context.get("x509_subject_alternative_name", ())]
    uris = tuple(name for name in sans if "://" in name)
    ips: list[str] = []
    for name in sans:
        with contextlib.suppress(ValueError):  # not an IP address: DNS or URI
            ips.append(str(ipaddress.ip_address(name)))
    dns = tuple(name for name in sans if name not in uris and name not in ips)
    common_names = auth_context.get("x509_common_name", ())
    return PeerIdentity(
        common_name=common_names[0].decode() if common_names else None,
        dns_names=dns,
        uris=uris,
        ip_addresses=tuple(ips),
    )


class IdentityReader:
    """Turns a call's auth context into a PeerIdentity, caching parsed certificates."""

    def __init__(self, cache_size: int = _CACHE_SIZE) -> None:
        self._cache: OrderedDict[bytes, PeerIdentity] = OrderedDict()
        self._cache_size = cache_size

    def read(self, auth_context: Mapping[str, Sequence[bytes]]) -> PeerIdentity | None:
        """The verified peer's identity, or None when the connection carries no certificate."""
        pems = auth_context.get("x509_pem_cert")
        if not pems:
            if (
                "x509_common_name" in auth_context
                or "x509_subject_alternative_name" in auth_context
            ):
                return _identity_from_core_names(auth_context)
            return None
        return self._cached(pems[0], x509.load_pem_x509_certificate)

    def from_der(self, der: bytes) -> PeerIdentity:
        """The identity in a verified certificate, DER-encoded (as Python's ssl gives it)."""
        return self._cached(der, x509.load_der_x509_certificate)

    def _cached(self, encoded: bytes, load: Callable[[bytes], x509.Certificate]) -> PeerIdentity:
        identity = self._cache.get(encoded)
        if identity is None:
            identity = identity_from_certificate(load(encoded))
            self._cache[encoded] = identity
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return identity
