"""Decide whether a certificate is good for a purpose, and if not, say why in one line.

`verify` is a pure library function: certificates in, a `Verified` or a
`VerificationFailed` out, whose message is the reason a person can act on
("expired on ...", "name mismatch: ...", "wrong EKU: ...", "unknown CA: ...").
The final word belongs to cryptography's RFC 5280 / Web PKI path validator; the
checks done here first exist only to name the reason, because the validator's
own errors ("candidates exhausted") do not.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from sidecar.errors import SidecarError
from sidecar.pki.x509 import (
    ROLE_EKU,
    Role,
    eku_allows,
    eku_name,
    is_ca,
    name_matches,
    san_names,
    server_subject,
)

_MAX_DEPTH = 8  # the validator's default too: no real chain is longer


class VerificationFailed(SidecarError):
    """The certificate was read but is not acceptable; the message is the one-line reason."""


@dataclass(frozen=True)
class Verified:
    """A chain that passed: leaf first, trusted root last."""

    chain: tuple[x509.Certificate, ...]
    purpose: Role
    server_name: str | None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def utc(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def dn(name: x509.Name) -> str:
    return repr(name.rfc4514_string())


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    """True for a root: issued by itself and signed by its own key."""
    return cert.issuer == cert.subject and _signed_by(cert, cert)


def _few(certs: Sequence[x509.Certificate]) -> str:
    names = [cert.subject.rfc4514_string() for cert in certs[:3]]
    more = f" and {len(certs) - 3} more" if len(certs) > 3 else ""
    return "[" + ", ".join(names) + more + "]"


def _path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> list[x509.Certificate]:
    """Leaf to trusted root by name and signature; raise with the link that is missing."""
    path = [leaf]
    for _ in range(_MAX_DEPTH):
        current = path[-1]
        root = next((c for c in roots if _signed_by(current, c)), None)
        if root is not None:
            return path if root == current else [*path, root]
        parent = next((c for c in intermediates if c not in path and _signed_by(current, c)), None)
        if parent is None:
            raise VerificationFailed(_unknown_ca(current, leaf, intermediates, roots))
        path.append(parent)
    raise VerificationFailed(f"unknown CA: no trusted root within {_MAX_DEPTH} certificates")


def _unknown_ca(
    current: x509.Certificate,
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> str:
    issuer = dn(current.issuer)
    if is_self_signed(current):
        return f"unknown CA: {issuer} is self-signed and not in the CA bundle {_few(roots)}"
    via = "" if current is leaf else f" (chain ends at {dn(current.subject)})"
    if any(c.subject == current.issuer for c in [*roots, *intermediates]):
        return f"unknown CA: issued by {issuer}{via}, but the {issuer} given has another key"
    hint = "" if intermediates else " (no intermediates given)"
    bundle = _few(roots)
    return f"unknown CA: issued by {issuer}{via}, which the CA bundle {bundle} does not hold{hint}"


def _check_dates(path: Sequence[x509.Certificate], now: datetime.datetime) -> None:
    for position, cert in enumerate(path):
        who = "" if position == 0 else f"CA {dn(cert.subject)} "
        if now > cert.not_valid_after_utc:
            raise VerificationFailed(f"{who}expired on {utc(cert.not_valid_after_utc)}")
        if now < cert.not_valid_before_utc:
            raise VerificationFailed(
                f"{who}not yet valid: valid from {utc(cert.not_valid_before_utc)}"
            )


def _check_leaf(cert: x509.Certificate, purpose: Role, server_name: str | None) -> None:
    if is_ca(cert):
        raise VerificationFailed(f"{dn(cert.subject)} is a CA certificate, not a {purpose}")
    try:
        ekus = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        ekus = []  # no EKU extension: any usage (RFC 5280 4.2.1.12)
    if ekus and not eku_allows(ekus, purpose):
        has = ", ".join(eku_name(oid) for oid in ekus)
        raise VerificationFailed(
            f"wrong EKU: a {purpose} needs {eku_name(ROLE_EKU[purpose])}, cert has [{has}]"
        )
    if server_name is not None and not name_matches(cert, server_name):
        names = ", ".join(san_names(cert)) or f"none; subject {dn(cert.subject)} is not used"
        raise VerificationFailed(f"name mismatch: wanted {server_name}, cert names are [{names}]")


def _eku_validator(
    purpose: Role,
) -> Callable[[Policy, x509.Certificate, x509.ExtendedKeyUsage | None], None]:
    def check(policy: Policy, cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None) -> None:
        if ext is not None and ROLE_EKU[purpose] not in ext:
            raise ValueError(f"required EKU {eku_name(ROLE_EKU[purpose])} not found")

    return check


def _validate(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    purpose: Role,
    server_name: str | None,
    now: datetime.datetime,
) -> list[x509.Certificate]:
    builder = PolicyBuilder().store(Store(list(roots))).time(now)
    if purpose == "server" and server_name is not None:
        return builder.build_server_verifier(server_subject(server_name)).verify(
            leaf, list(intermediates)
        )
    # No name to check, so the client verifier walks the chain; the leaf policy
    # then checks the wanted EKU. A client needs no SAN: TLS stacks accept a bare CN.
    leaf_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _eku_validator(purpose)
    )
    if purpose == "client":
        leaf_policy = leaf_policy.may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
        )
    builder = builder.extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy
    )
    return builder.build_client_verifier().verify(leaf, list(intermediates)).chain


def verify(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    purpose: Role = "server",
    server_name: str | None = None,
    at: datetime.datetime | None = None,
) -> Verified:
    """Verify leaf (with the untrusted intermediates given) against the trusted roots.

    For purpose "server" the leaf needs serverAuth and, when server_name is
    given, a SAN matching it; for "client", clientAuth. Raises VerificationFailed
    with the first reason found: unknown CA, dates, not a leaf, EKU, name, then
    whatever the path validator still refuses.
    """
    if not roots:
        raise VerificationFailed("unknown CA: the CA bundle is empty")
    now = at or datetime.datetime.now(datetime.timezone.utc)
    path = _path(leaf, intermediates, roots)
    _check_dates(path, now)
    _check_leaf(leaf, purpose, server_name)
    try:
        chain = _validate(leaf, intermediates, roots, purpose, server_name, now)
    except (VerificationError, ValueError) as exc:
        reason = str(exc).removeprefix("validation failed: ").split(" (encountered processing")[0]
        raise VerificationFailed(f"refused by the path validator: {reason}") from exc
    return Verified(tuple(chain), purpose, server_name)
