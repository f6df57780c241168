"""The caller's verified identity for the app: the `x-forwarded-client-cert` value, in
Envoy's XFCC format, so that apps written for Envoy or Istio read it unchanged.

    Hash=<sha256 hex>;Subject="CN=alice,O=Example";URI=spiffe://example.org/alice;DNS=a;DNS=b

Elements are `key=value` pairs joined by `;`; a value holding `,`, `;`, `=` or `"` is
double-quoted, with `"` written `\\"` (Envoy quotes the subject always). A header value
must be printable ASCII: any other character of a name (a control, a letter that is not
ASCII) is written as its UTF-8 bytes in `\\xx` hex, as OpenSSL's RFC 2253 output does, so
that no name is lost and none reads as another. Which elements are sent is a setting
(identity_header_fields). A caller's own header of that name never reaches the app
(auth/headers.py), so the app can trust it.
"""

from __future__ import annotations

from sidecar.auth.identity import PeerIdentity
from sidecar.config.settings import IDENTITY_ELEMENTS

_SPECIAL = frozenset(',;="')


def xfcc(identity: PeerIdentity, fields: tuple[str, ...] = IDENTITY_ELEMENTS) -> str:
    """The header value for this caller, with the chosen elements (in Envoy's order)."""
    elements = []
    if "Hash" in fields:
        elements.append(f"Hash={identity.fingerprint}")
    if identity.unreadable is None:  # names that cannot be read are not vouched for
        if "Subject" in fields:
            elements.append(f"Subject={_quoted(_ascii(identity.subject))}")
        if "URI" in fields:
            elements += [f"URI={_value(_ascii(uri))}" for uri in identity.uris]
        if "DNS" in fields:
            elements += [f"DNS={_value(_ascii(name))}" for name in identity.dns_names]
    return ";".join(elements)


def _ascii(text: str) -> str:
    """Printable ASCII as it is; any other character as its UTF-8 bytes, `\\xx` each."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        char
        if char.isascii() and char.isprintable()
        else "".join(f"\\{byte:02x}" for byte in char.encode("utf-8", "surrogatepass"))
        for char in text
    )


def _value(text: str) -> str:
    return _quoted(text) if _SPECIAL.intersection(text) else text


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'
