"""Certificate revocation lists: which callers' certificates their CA has revoked.

A route's `crl` files hold CRLs, PEM (several to a file) or DER (one), each of
them signed by a CA of the route's `ca` bundle: a CRL whose issuer is not in the
bundle, or whose signature does not verify with that CA's key, is refused (at
start-up, exit 2; at a reload, the last good lists stay). A CRL of an
intermediate CA that callers present in their chain needs that intermediate in
`ca`. Delta CRLs and CRLs that cover only part of their issuer's certificates
(indirect, some reasons only, CA certificates only) are refused: the lists here
must be complete.

What is checked is the caller's own certificate (the leaf, the one certificate both
data planes are given): its serial against the CRL of its issuer, found by name, or,
when several CAs of the bundle share that name (a CA whose key was replaced), by the
key its AuthorityKeyIdentifier names (Revocations.covering).
A caller whose issuer has no CRL here is refused too, as OpenSSL's CRL check
refuses it under nginx and Envoy: a route given CRLs promises that every caller
was checked against one. A CRL past its nextUpdate ("stale") still applies; with
`crl_stale: deny` its issuer's callers are refused until a fresh one is loaded.

A `CrlSource` reads the files and holds the checked result, `Revocations`, which the
policy consults on every decision it makes (auth/policy.py); `reload()` swaps it,
as pki/credentials.py swaps the TLS material.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from sidecar.config.model import StaleAction
from sidecar.config.pem import PemSource
from sidecar.errors import ConfigError
from sidecar.observe.logs import escape
from sidecar.pki.x509 import parse_certificates, pem_blocks

# A CA's whole CRL may be large (a public CA's: tens of MiB); past this a file is refused
# unread. It is parsed on the event loop, at start-up and when it changes.
MAX_CRL_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class RevocationList:
    """One CRL, checked: its issuer, the serials it revokes and until when it is current."""

    file: str  # the file's name (not its path: denials tell it to callers)
    issuer: str  # RFC 4514, as PeerIdentity.issuer spells a caller's
    signer_key_id: str  # hex: the subject key identifier of the CA whose key signed it
    serials: frozenset[str]  # lowercase hex, no leading zeros, as PeerIdentity.serial
    next_update: datetime.datetime | None  # None: the CRL says no date (never stale)

    def stale(self, now: datetime.datetime) -> bool:
        return self.next_update is not None and now > self.next_update

    def describe(self) -> str:
        until = f"{self.next_update:%Y-%m-%d %H:%M:%S} UTC" if self.next_update else "no date"
        count = len(self.serials)
        return (
            f"{self.file}: issuer {escape(self.issuer)}, {count} revoked "
            f"certificate{'' if count == 1 else 's'}, next update {until}"
        )


@dataclass(frozen=True)
class Revocations:
    """A route's CRLs, by issuer name (one per key of that name), and what a stale one means."""

    by_issuer: Mapping[str, tuple[RevocationList, ...]]
    stale_action: StaleAction = "warn"
    # How many CAs of the bundle bear each issuer name that has a CRL (several: a CA whose
    # key was replaced kept its name).
    namesakes: Mapping[str, int] = field(default_factory=dict)

    @property
    def lists(self) -> list[RevocationList]:
        return [crl for lists in self.by_issuer.values() for crl in lists]

    def covering(self, issuer: str, authority_key_id: str) -> tuple[RevocationList, ...]:
        """The CRLs that cover a certificate of this issuer. One CA of the bundle has that
        name: its CRL. Several: the CRL signed with the key the certificate's
        AuthorityKeyIdentifier names; a certificate naming none, every CRL of the name, if
        each of those CAs has one (else it cannot be told which covers it: none)."""
        lists = self.by_issuer.get(issuer, ()) if issuer else ()
        namesakes = self.namesakes.get(issuer, 1)
        if namesakes <= 1:
            return lists
        if authority_key_id:
            return tuple(crl for crl in lists if crl.signer_key_id == authority_key_id)
        return lists if len(lists) >= namesakes else ()

    def refusal(
        self, issuer: str, authority_key_id: str, serial: str, now: datetime.datetime | None = None
    ) -> str | None:
        """Why the CRLs refuse the certificate of this issuer (RFC 4514), issuer key (hex)
        and serial (hex), as the denial says it after the caller's name; None when not."""
        lists = self.covering(issuer, authority_key_id)
        if not lists:
            return (
                f"no CRL of its issuer {escape(issuer) or '(unreadable)'}"
                f"{' (with its key)' if self.by_issuer.get(issuer) else ''} is loaded (crl), "
                "so it cannot be checked for revocation"
            )
        for crl in lists:
            if serial in crl.serials:
                return f"certificate serial {serial} is revoked (crl {escape(crl.file)})"
        if self.stale_action == "deny":
            now = now or _now()
            for crl in lists:
                if crl.stale(now):
                    assert crl.next_update is not None
                    return (
                        f"the CRL of its issuer ({escape(crl.file)}) is stale since "
                        f"{crl.next_update:%Y-%m-%d %H:%M:%S} UTC (crl_stale: deny)"
                    )
        return None

    def stale(self, now: datetime.datetime | None = None) -> list[RevocationList]:
        now = now or _now()
        return [crl for crl in self.lists if crl.stale(now)]

    def next_stale(self, now: datetime.datetime | None = None) -> datetime.datetime | None:
        """When the next CRL still current goes stale, if one will."""
        now = now or _now()
        ahead = [
            crl.next_update
            for crl in self.lists
            if crl.next_update is not None and crl.next_update > now
        ]
        return min(ahead, default=None)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def load_revocations(
    sources: tuple[PemSource, ...],
    contents: tuple[bytes, ...],
    ca_pem: bytes,
    ca_setting: str,
    stale_action: StaleAction,
) -> Revocations:
    """The CRLs in contents (read from sources), each checked against the CA bundle; a
    ConfigError naming the file and the fault for the first that does not pass."""
    authorities = parse_certificates(ca_pem, ca_setting)
    by_issuer: dict[str, tuple[RevocationList, ...]] = {}
    for source, data in zip(sources, contents, strict=True):
        where = f"{source.setting}: {source.origin}"
        for crl in _parse(data, where):
            checked = _checked(crl, where, source, authorities, ca_setting)
            lists = by_issuer.get(checked.issuer, ())
            for earlier in lists:
                if earlier.signer_key_id == checked.signer_key_id:
                    raise ConfigError(
                        f"{where}: a second CRL of {escape(checked.issuer)} (the first is in "
                        f"{escape(earlier.file)}): give only the current one"
                    )
            by_issuer[checked.issuer] = (*lists, checked)
    names = Counter(_subject(ca) for ca in authorities)
    namesakes = {issuer: names[issuer] for issuer in by_issuer}
    return Revocations(by_issuer, stale_action, namesakes)


@dataclass(frozen=True)
class _Authority:
    """A CA of the bundle that may have signed a CRL, as the checks need it (one-line
    errors for what cannot be read)."""

    certificate: x509.Certificate
    subject: str
    key_id: str  # its SubjectKeyIdentifier (what its certificates' AKI names), hex
    may_sign_crls: bool

    @classmethod
    def of(cls, ca: x509.Certificate, ca_setting: str) -> _Authority | None:
        """None for a CA whose key cryptography cannot use (an odd curve): it cannot have
        signed a CRL this sidecar can check, and another CA of its name may have."""
        try:
            subject = ca.subject.rfc4514_string()
            try:
                key_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
                identifier = key_id.value.digest
            except x509.ExtensionNotFound:  # RFC 5280 method 1, as CAs derive it
                public_key = ca.public_key()
                identifier = x509.SubjectKeyIdentifier.from_public_key(public_key).digest
            try:
                usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
                may_sign_crls = usage.crl_sign
            except x509.ExtensionNotFound:
                may_sign_crls = True
        except UnsupportedAlgorithm:
            return None
        except (
            ValueError,
            TypeError,
            x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType,
        ) as error:
            raise ConfigError(
                f"{ca_setting}: a CA certificate (serial {ca.serial_number:x}) cannot be read "
                f"to check CRLs with: {error}"
            ) from None
        return cls(ca, subject, identifier.hex(), may_sign_crls)


def _subject(ca: x509.Certificate) -> str | None:
    try:
        return ca.subject.rfc4514_string()
    except ValueError:
        return None


def _parse(data: bytes, where: str) -> list[x509.CertificateRevocationList]:
    if b"-----BEGIN" in data:
        blocks = [block for label, block in pem_blocks(data) if label == b"X509 CRL"]
        if not blocks:
            raise ConfigError(f"{where}: no CRL in it (PEM blocks of type X509 CRL)")
        crls = []
        for index, block in enumerate(blocks):
            try:
                crls.append(x509.load_pem_x509_crl(block))
            except ValueError as error:
                raise ConfigError(f"{where}: CRL {index + 1} cannot be read: {error}") from None
        return crls
    try:
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        raise ConfigError(f"{where}: not a CRL (PEM or DER)") from None


def _checked(
    crl: x509.CertificateRevocationList,
    where: str,
    source: PemSource,
    authorities: list[x509.Certificate],
    ca_setting: str,
) -> RevocationList:
    try:
        issuer = crl.issuer.rfc4514_string()
        _check_complete(crl.extensions, where)
        serials = frozenset(format(entry.serial_number, "x") for entry in crl)
        next_update = crl.next_update_utc
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as error:
        raise ConfigError(f"{where}: the CRL cannot be read: {error}") from None
    namesakes = [ca for ca in authorities if _subject(ca) == issuer]
    signers = [
        authority
        for authority in (_Authority.of(ca, ca_setting) for ca in namesakes)
        if authority is not None
    ]
    if not namesakes:
        held = ", ".join(escape(_subject(ca) or "?") for ca in authorities[:4])
        raise ConfigError(
            f"{where}: its issuer {escape(issuer)} is not a certificate of {ca_setting} "
            f"(which holds {held}{', ...' if len(authorities) > 4 else ''}): its signature "
            "cannot be checked"
        )
    if signers and not any(signer.may_sign_crls for signer in signers):
        raise ConfigError(
            f"{where}: its issuer {escape(issuer)} may not sign CRLs (its key usage has no cRLSign)"
        )
    signer = next(
        (ca for ca in signers if ca.may_sign_crls and _signature_valid(crl, ca.certificate)), None
    )
    if signer is None:
        raise ConfigError(
            f"{where}: its signature does not verify with the key of {escape(issuer)} in "
            f"{ca_setting}"
        )
    file = PurePath(source.path).name if source.path is not None else "inline PEM"
    return RevocationList(file, issuer, signer.key_id, serials, next_update)


def _check_complete(extensions: x509.Extensions, where: str) -> None:
    """Refuse a CRL that is not its issuer's whole list (the checks here assume it is)."""
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.DeltaCRLIndicator):
            raise ConfigError(f"{where}: a delta CRL; give the complete (base) CRL")
        if isinstance(value, x509.IssuingDistributionPoint) and (
            value.indirect_crl
            or value.only_some_reasons
            or value.only_contains_ca_certs
            or value.only_contains_attribute_certs
        ):
            raise ConfigError(
                f"{where}: a partial CRL (indirect, or some reasons or CA certificates only); "
                "give the issuer's complete CRL"
            )
        if extension.critical and not isinstance(
            value, (x509.CRLNumber, x509.AuthorityKeyIdentifier, x509.IssuingDistributionPoint)
        ):
            raise ConfigError(
                f"{where}: a critical CRL extension not understood: {extension.oid.dotted_string}"
            )


def _signature_valid(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):  # a key that cannot sign CRLs
        return False


class CrlSource:
    """A route's CRL files: read and checked at start, again by `reload()` when they (or
    the CA bundle they are checked against) changed; `current` is what the policy uses."""

    def __init__(
        self, sources: tuple[PemSource, ...], stale_action: StaleAction, ca_pem: bytes,
        ca_setting: str,
    ) -> None:  # fmt: skip
        contents = self._read(sources)
        # What was read and checked last (or, changed() compares, what the files hold now).
        self._state: tuple[object, ...] = (sources, stale_action, ca_pem, ca_setting, contents)
        # A ConfigError here stops the start-up.
        self.current = load_revocations(sources, contents, ca_pem, ca_setting, stale_action)
        self._refused: object = None  # what the last reload refused: reported once

    @staticmethod
    def _read(sources: tuple[PemSource, ...]) -> tuple[bytes, ...]:
        return tuple(source.read(MAX_CRL_BYTES) for source in sources)

    def _wanted(
        self, sources: tuple[PemSource, ...], stale_action: StaleAction, ca_pem: bytes,
        ca_setting: str,
    ) -> tuple[object, ...]:  # fmt: skip
        try:
            contents: tuple[bytes, ...] | str = self._read(sources)
        except ConfigError as error:
            contents = str(error)
        return (sources, stale_action, ca_pem, ca_setting, contents)

    def changed(
        self, sources: tuple[PemSource, ...], stale_action: StaleAction, ca_pem: bytes,
        ca_setting: str,
    ) -> bool:  # fmt: skip
        """Whether a reload would find something new: neither what is in use nor what the
        last reload refused (a periodic check reads the files; it checks them only then)."""
        wanted = self._wanted(sources, stale_action, ca_pem, ca_setting)
        return wanted != self._state and wanted != self._refused

    def reload(
        self, sources: tuple[PemSource, ...], stale_action: StaleAction, ca_pem: bytes,
        ca_setting: str,
    ) -> bool:  # fmt: skip
        """Read and check the CRLs again (or new files, or against a new CA bundle); swap
        the result in and say whether the lists changed. ConfigError: the current stay."""
        wanted = self._wanted(sources, stale_action, ca_pem, ca_setting)
        if wanted == self._state:
            return False
        contents = wanted[4]
        try:
            if not isinstance(contents, tuple):  # the files could not be read: why
                raise ConfigError(str(contents))
            loaded = load_revocations(sources, contents, ca_pem, ca_setting, stale_action)
        except ConfigError:
            self._refused = wanted
            raise
        self._state, self._refused = wanted, None
        changed = loaded != self.current
        self.current = loaded
        return changed
