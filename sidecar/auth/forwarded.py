"""The caller's verified identity for the app: the `x-forwarded-client-cert` value, in
Envoy's XFCC format, so that apps written for Envoy or Istio read it unchanged.

    Hash=<sha256 hex>;Subject="CN=alice,O=Example";URI=spiffe://example.org/alice;DNS=a;DNS=b

Elements are `key=value` pairs joined by `;`; a value holding `,`, `;`, `=` or `"` is
double-quoted, with `"` written `\\"` (Envoy quotes the subject always). A header value
must be printable ASCII: any other character of a name (a control, a letter that is not
ASCII), and a backslash, is written as its UTF-8 bytes in `\\xx` hex, as OpenSSL's RFC 2253
output does, so that no name is lost and none reads as another. The subject keeps its
RFC 4514 escapes (`\\,`), but an escaped backslash or quote is written as RFC 4514's hex
pair (`\\5c`, `\\22`): the same name, and in the whole value no backslash ever stands
before a quote, so no reader can take the closing quote, or an element after it, for part
of a name. Which elements are sent is a setting (identity_header_fields). A caller's own
header of that name never reaches the app (auth/headers.py), so the app can trust it.
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
            elements.append(f"Subject={_quoted(_subject(identity.subject))}")
        if "URI" in fields:
            elements += [f"URI={_value(_ascii(uri))}" for uri in identity.uris]
        if "DNS" in fields:
            elements += [f"DNS={_value(_ascii(name))}" for name in identity.dns_names]
    return ";".join(elements)


def _ascii(text: str, backslash: bool = True) -> str:
    """Printable ASCII as it is; any other character (and a backslash, unless told not to)
    as its UTF-8 bytes, `\\xx` each."""
    if text.isascii() and text.isprintable() and not (backslash and "\\" in text):
        return text
    return "".join(
        char
        if char.isascii() and char.isprintable() and not (backslash and char == "\\")
        else "".join(f"\\{byte:02x}" for byte in char.encode("utf-8", "surrogatepass"))
        for char in text
    )


def _subject(rfc4514: str) -> str:
    """The subject in RFC 4514 (its escapes kept: `\\,` stays), in printable ASCII, an
    escaped backslash or quote as its hex pair (`\\\\` -> `\\5c`, `\\"` -> `\\22`)."""
    text = _ascii(rfc4514, backslash=False)
    if "\\" not in text:
        return text
    written, position = [], 0
    while position < len(text):
        char = text[position]
        if char == "\\" and position + 1 < len(text):
            following = text[position + 1]
            written.append({"\\": "\\5c", '"': "\\22"}.get(following, char + following))
            position += 2
        else:
            written.append(char)
            position += 1
    return "".join(written)


def _value(text: str) -> str:
    return _quoted(text) if _SPECIAL.intersection(text) else text


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'
