"""Who is calling: the caller's identity, read from the client certificate of the connection.

The TLS layer (Python's ssl on the spliced data plane, grpc core on the per-call
one) has already verified the chain; this module only names the caller. The
certificate is parsed once and cached by its bytes, so each further connection or
call costs a dictionary lookup, and SAN types (DNS, URI, IP) are told apart
exactly rather than guessed from core's flattened string list.

A CA may sign names no honest certificate carries: a SAN that is not valid
UTF-8 (let alone the IA5String, ASCII, that RFC 5280 requires for DNS and URI
names), several CNs in one subject, a look-alike letter. Reading never raises:
a certificate whose names cannot be read gives an identity that says why and
that no rule matches. Names are kept as read; `description` shows them escaped.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import hashlib
import ipaddress
import logging
import ssl
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from sidecar.observe.logs import escape

logger = logging.getLogger("sidecar.identity")  # by name: operators filter on it

_CACHE_SIZE = 4096
# What a description shows of a certificate's names: it goes into each log line and
# denial message, and a CA may sign a certificate with thousands of long names.
_SHOWN_NAMES = 16
_SHOWN_CHARS = 256

# What a certificate holds that cryptography may refuse to read: a name or SAN that
# is not valid DER, UTF-8, PrintableString..., an extension twice, an unknown name form.
# What cryptography raises on a certificate OpenSSL verified but it cannot read (an odd
# encoding, a version field of v4, ...).
_UNREADABLE = (
    ValueError,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,
)


@dataclass(frozen=True)
class PeerIdentity:
    """The names a verified client certificate carries, as the certificate spells them."""

    common_names: tuple[str, ...] = ()  # the subject's CNs, in DER order (normally one)
    organizational_units: tuple[str, ...] = ()  # the subject's OUs (rules by team: allow_ou)
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    subject: str = ""  # RFC 4514, as `openssl x509 -subject -nameopt RFC2253` writes it
    issuer: str = ""  # RFC 4514: whose CRL lists the certificate (pki/revocation.py)
    authority_key_id: str = ""  # hex, from its AuthorityKeyIdentifier: which key of issuer
    serial: str = ""  # lowercase hex, no leading zeros
    fingerprint: str = ""  # SHA-256 of the certificate (DER), lowercase hex
    unreadable: str | None = None  # why the names could not be read; then no rule matches

    @property
    def common_name(self) -> str | None:
        """The subject's CN when it has exactly one; None with none, or several.

        With several CNs, which one names the subject depends on who reads it
        (OpenSSL and Python take the first, Go the last): `CN=mallory+CN=alice`
        is neither, so a certificate like that matches no CN rule.
        """
        return self.common_names[0] if len(self.common_names) == 1 else None

    @property
    def spiffe_id(self) -> str | None:
        """The SPIFFE ID (the spiffe:// URI SAN), if the certificate is an X.509-SVID."""
        return next((uri for uri in self.uris if uri.startswith("spiffe://")), None)

    @functools.cached_property  # computed once per certificate: the relay logs it on every call
    def description(self) -> str:
        """Short human form for logs and denial messages, e.g. `CN=alice, DNS=alice.example`.

        Printable ASCII only: every name is escaped (`adm\\u0131n`, `\\n`), so no
        name looks like another or breaks a log line; a long list is cut short.
        """
        names = [("CN", name) for name in self.common_names]
        names += [("DNS", name) for name in self.dns_names]
        names += [("URI", uri) for uri in self.uris]
        names += [("IP", ip) for ip in self.ip_addresses]
        parts = [f"{kind}={_shown(name)}" for kind, name in names[:_SHOWN_NAMES]]
        if len(names) > _SHOWN_NAMES:
            parts.append(f"{len(names) - _SHOWN_NAMES} more names")
        if self.unreadable is not None:
            parts.insert(0, f"certificate serial {self.serial or '?'}")
            parts.append(f"names unreadable: {escape(self.unreadable)}")
        elif len(self.common_names) > 1:
            parts.append("several CNs")
        return ", ".join(parts) if parts else f"certificate serial {self.serial}"


def _shown(name: str) -> str:
    if len(name) > _SHOWN_CHARS:
        return f"{escape(name[:_SHOWN_CHARS])}...({len(name)} characters)"
    return escape(name)


def identity_from_certificate(certificate: x509.Certificate) -> PeerIdentity:
    """The names in `certificate`; one whose names cannot be read gives an unreadable identity."""
    serial = issuer = ""
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex()
    try:
        serial = format(certificate.serial_number, "x")
        issuer = certificate.issuer.rfc4514_string()
        authority_key_id = _authority_key_id(certificate)
        common_names = tuple(
            str(attribute.value)  # a str but for X500UniqueIdentifier, never a CN
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
        organizational_units = tuple(
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(
                NameOID.ORGANIZATIONAL_UNIT_NAME
            )
        )
        try:
            sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            san = x509.SubjectAlternativeName([])
        else:
            san = sans.value
        return PeerIdentity(
            subject=certificate.subject.rfc4514_string(),
            common_names=common_names,
            organizational_units=organizational_units,
            dns_names=tuple(san.get_values_for_type(x509.DNSName)),
            uris=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
            ip_addresses=tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
            issuer=issuer,
            authority_key_id=authority_key_id,
            serial=serial,
            fingerprint=fingerprint,
        )
    except _UNREADABLE as error:
        return PeerIdentity(
            issuer=issuer, serial=serial, fingerprint=fingerprint, unreadable=_reason(error)
        )


def _authority_key_id(certificate: x509.Certificate) -> str:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except x509.ExtensionNotFound:
        return ""
    key_identifier = extension.value.key_identifier
    return key_identifier.hex() if key_identifier is not None else ""


def _unreadable(der: bytes, error: Exception) -> PeerIdentity:
    """A certificate the TLS layer verified but cryptography cannot load: no names (no
    rule matches it), but its fingerprint and serial, read from the bytes, so that
    deny_fingerprints, deny_serials and the identity header's Hash still apply to it."""
    return PeerIdentity(
        fingerprint=hashlib.sha256(der).hexdigest(),
        serial=_der_serial(der),
        unreadable=_reason(error),
    )


def _der_serial(der: bytes) -> str:
    """The serial of a DER certificate, read by hand (Certificate and tbsCertificate
    SEQUENCEs, an optional [0] version, then the INTEGER), as lowercase hex; "" if the
    bytes are not shaped so."""
    try:
        position = _content(der, 0, 0x30)  # Certificate
        position = _content(der, position, 0x30)  # tbsCertificate
        if der[position] == 0xA0:  # [0] EXPLICIT version: skipped
            start = _content(der, position, 0xA0)
            position = start + _length(der, position)[0]
        start = _content(der, position, 0x02)
        length = _length(der, position)[0]
        if not 0 < length <= len(der) - start:
            return ""
        return format(int.from_bytes(der[start : start + length], "big", signed=True), "x")
    except (IndexError, ValueError):
        return ""


def _length(der: bytes, position: int) -> tuple[int, int]:
    """The length of the DER element at position, and where its content starts."""
    first = der[position + 1]
    if first < 0x80:
        return first, position + 2
    count = first & 0x7F
    if not 0 < count <= 4:
        raise ValueError("unsupported DER length")
    return int.from_bytes(der[position + 2 : position + 2 + count], "big"), position + 2 + count


def _content(der: bytes, position: int, tag: int) -> int:
    """Where the content of the element at position starts, if it has this tag."""
    if der[position] != tag:
        raise ValueError("unexpected DER tag")
    return _length(der, position)[1]


def _reason(error: Exception) -> str:
    """cryptography's message, e.g. `error parsing asn1 value: ParseError { ... }`."""
    return f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)


def _identity_from_core_names(auth_context: Mapping[str, Sequence[bytes]]) -> PeerIdentity:
    """Fallback when core gave no PEM: classify core's SAN strings as best we can."""
    try:
        sans = [value.decode() for value in auth_context.get("x509_subject_alternative_name", ())]
        common_names = tuple(value.decode() for value in auth_context.get("x509_common_name", ()))
    except UnicodeDecodeError as error:
        return PeerIdentity(unreadable=f"a name is not UTF-8: {error}")
    uris = tuple(name for name in sans if "://" in name)
    ips: list[str] = []
    for name in sans:
        with contextlib.suppress(ValueError):  # not an IP address: DNS or URI
            ips.append(str(ipaddress.ip_address(name)))
    dns = tuple(name for name in sans if name not in uris and name not in ips)
    return PeerIdentity(
        common_names=common_names,
        dns_names=dns,
        uris=uris,
        ip_addresses=tuple(ips),
    )


def _pem_to_der(pem: bytes) -> bytes:
    """grpc core's PEM of the peer's certificate as DER (ValueError if it is not PEM)."""
    try:
        return ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    except (UnicodeDecodeError, binascii.Error) as error:
        raise ValueError(f"not a PEM certificate: {error}") from None


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
        return self._cached(pems[0], _pem_to_der)

    def from_der(self, der: bytes) -> PeerIdentity:
        """The identity in a verified certificate, DER-encoded (as Python's ssl gives it)."""
        return self._cached(der, bytes)

    def _cached(self, encoded: bytes, to_der: Callable[[bytes], bytes]) -> PeerIdentity:
        identity = self._cache.get(encoded)
        if identity is None:
            der = b""
            try:
                der = to_der(encoded)
                identity = identity_from_certificate(x509.load_der_x509_certificate(der))
            except _UNREADABLE as error:  # the TLS layer accepted it; cryptography is stricter
                identity = _unreadable(der, error)
            if identity.unreadable is not None:
                # Once per certificate (the cache remembers it): each of its connections
                # and calls is denied, and each denial is logged, rate limited.
                logger.warning(
                    "a caller's certificate cannot be read, no allow rule matches it: %s",
                    identity.description,
                )
            self._cache[encoded] = identity
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return identity
