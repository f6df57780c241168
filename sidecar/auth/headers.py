"""Which request and response fields cross the sidecar: the one table, for both data planes.

A route's `HeaderRules` applies it: the splice's header-block filter
(h2/headerblock.py) asks it about each request field, the grpc plane's relay
filters metadata with it, and it names what the sidecar injects (its
user-agent). Rules are per route, and so are their caches.

Application metadata (text and `-bin`, repeated keys, in order) passes unchanged.
What else a request carries is one of:
- the request pseudo-headers (:method, :scheme, :path, :authority) and the
  protocol's own fields (`te`, `content-type`, `grpc-timeout`, `grpc-encoding`,
  `grpc-accept-encoding`): the splice keeps them as sent, since it relays the
  message bytes unchanged (their encoding and the caller's deadline still hold);
  the grpc plane's relay re-derives them from the call (deadline, compression),
  so there they are dropped from the metadata it forwards;
- dropped on both planes: `user-agent` (it names the sidecar's upstream client
  on the next hop; the splice sends its own), `host` and `content-length`,
  `x-forwarded-client-cert` (the caller's identity as Envoy writes it: the app
  must be able to trust that only the sidecar sets it), and every other `grpc-*`
  key, which is reserved for the protocol;
- malformed (RFC 9113 8.2.1, 8.2.2, 8.3): names that are empty or carry
  uppercase, controls, space, non-ASCII or a colon past the first byte,
  pseudo-headers other than the four of a request, connection-specific fields
  (`connection`, `keep-alive`, `proxy-connection`, `transfer-encoding`,
  `upgrade`), `te` other than `trailers`, values holding NUL, CR or LF. The
  splice answers such a request itself (INTERNAL, with the reason); it never
  reaches the app. On the grpc plane grpc core refuses them first.
Injected: `user-agent: sidecar/VERSION` on every request (the splice adds the
field; the grpc plane's channel sends it, grpc core appending its own name).
Responses: the splice relays the app's response blocks as they are (it reads
them only for the status); the grpc plane forwards the app's metadata minus the
fields grpc core writes itself (the same names as for requests), but keeps
`grpc-status-details-bin`: it is the rich error status (google.rpc.Status) and
belongs to the application. What reaches the caller is the same either way, but
for application keys starting with `grpc-`, which the grpc plane drops.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from sidecar import __version__

Metadata = tuple[tuple[str, str | bytes], ...]

REQUEST_PSEUDO_HEADERS: Final = frozenset({b":method", b":scheme", b":path", b":authority"})
# Kept as sent by the splice; the grpc plane re-derives them.
PROTOCOL_FIELDS: Final = frozenset(
    {b"te", b"content-type", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"}
)
# Dropped on both planes (the grpc-* prefix too). x-forwarded-client-cert names the
# caller to the app, and only the sidecar may set it: a caller's own is never relayed.
IDENTITY_FIELD: Final = b"x-forwarded-client-cert"
DROPPED_FIELDS: Final = frozenset({b"user-agent", b"host", b"content-length", IDENTITY_FIELD})
# RFC 9113 8.2.2 (dropped: see the module doc).
CONNECTION_SPECIFIC_FIELDS: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_STATUS_DETAILS = "grpc-status-details-bin"
USER_AGENT: Final = f"sidecar/{__version__}"
_CACHE_LIMIT = 4096  # field names whose verdict a route remembers; cleared when full
_CACHED_NAME_LIMIT = 128  # bytes: only small names are remembered

# RFC 9113 8.2.1: a name holds no 0x00-0x20, no uppercase, no 0x7f-0xff, and no colon
# (but a pseudo-header's first byte).
_VALID_NAME = re.compile(rb"[!-9;-@\[-~]+")
# RFC 9113 8.2.1: nor a value NUL, CR or LF (one search: three `in` tests cost 5 times more).
_FORBIDDEN_IN_VALUE = re.compile(rb"[\0\r\n]")
# A gRPC call's :path: "/" service "/" method (the gRPC HTTP/2 protocol). Servers differ on
# the rest (grpc-go routes `kv.KV/Delete` as `/kv.KV/Delete`; a server that decodes
# percent-escapes would take `/kv.KV/Dele%74e` for it), so a method rule could be written
# around: any other :path makes the request malformed. No IDL names a method with `%`.
_GRPC_PATH = re.compile(rb"/[^/?#%]+/[^/?#%]+")

KEEP: Final = ""  # a verdict: the field crosses
DROP: Final = "drop"  # a verdict: the field is left out


def request_verdict(name: bytes) -> str:
    """What the splice does with a request field of this name: KEEP, DROP, or the reason the
    request is malformed (a non-empty message for the caller)."""
    if name[:1] == b":":
        if name in REQUEST_PSEUDO_HEADERS:
            return KEEP
        return f"pseudo-header {_shown(name)} is not one of a request's"
    if not _VALID_NAME.fullmatch(name):
        if not name:
            return "empty field name"
        if name.lower() != name and _VALID_NAME.fullmatch(name.lower()):
            return f"field name {_shown(name)} has uppercase letters"
        return f"field name {_shown(name)} has a character RFC 9113 forbids"
    if name in PROTOCOL_FIELDS:
        return KEEP
    if name in DROPPED_FIELDS or name in CONNECTION_SPECIFIC_FIELDS or name.startswith(b"grpc-"):
        return DROP
    return KEEP


def value_problem(name: bytes, value: bytes) -> str | None:
    """Why a request field's value makes the request malformed, or None."""
    if _FORBIDDEN_IN_VALUE.search(value):
        return f"the value of {_shown(name)} holds NUL, CR or LF"
    if name == b":path":
        return path_problem(value)
    if name == b"te" and value != b"trailers":
        return f"te is {_shown(value)}; HTTP/2 allows only 'trailers'"
    return None


def path_problem(path: bytes) -> str | None:
    """Why a request's :path is not a gRPC method's (`/package.Service/Method`), or None."""
    if not path:
        return "empty :path"
    if not _GRPC_PATH.fullmatch(path):
        return f":path {_shown(path)} is not /service/method"
    return None


def _shown(text: bytes) -> str:
    """A caller's bytes, quoted and escaped for a message (never raw controls)."""
    shown = repr(text[:64])[1:]  # b'..' -> '..', with every non-printable escaped
    return shown if len(text) <= 64 else shown[:-1] + "...'"


class HeaderRules:
    """One route's header rules: what crosses each way and what the sidecar injects."""

    def __init__(self, user_agent: str = USER_AGENT) -> None:
        self.user_agent = user_agent
        # Verdicts by field name: the same few names recur call after call.
        self._verdicts: dict[bytes, str] = {}

    def judge_request_field(self, name: bytes, value: bytes) -> tuple[bool, str | None]:
        """Whether a request field crosses, and what makes the request malformed (or None)."""
        verdict = self._verdicts.get(name)
        if verdict is None:
            verdict = request_verdict(name)
            if len(name) <= _CACHED_NAME_LIMIT:
                if len(self._verdicts) >= _CACHE_LIMIT:
                    self._verdicts.clear()
                self._verdicts[name] = verdict
        if verdict is KEEP or verdict is DROP:
            return verdict is KEEP, value_problem(name, value)
        return False, verdict

    def request_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> Metadata:
        """The caller's metadata as the grpc plane forwards it to the upstream."""
        return tuple((key, value) for key, value in metadata if not _dropped_by_relay(key))

    def response_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Metadata:
        """The upstream's headers or trailers as the grpc plane hands them to the caller."""
        if not metadata:
            return ()
        return tuple(
            (key, value)
            for key, value in metadata
            if key == _STATUS_DETAILS or not _dropped_by_relay(key)
        )


def _dropped_by_relay(key: str) -> bool:
    encoded = key.encode("latin-1", "replace")
    return (
        key.startswith((":", "grpc-"))
        or encoded in PROTOCOL_FIELDS
        or encoded in DROPPED_FIELDS
        or encoded in CONNECTION_SPECIFIC_FIELDS
    )
