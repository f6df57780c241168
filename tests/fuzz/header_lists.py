"""Header lists for the header-block fuzz: gRPC requests and responses as clients and servers
send them, with the odd field no well-formed request has; and what the sidecar must do with
them, restated here from the design and RFC 9113 apart from h2/headerblock.py and auth/headers.py.

A request field crosses when it is a request pseudo-header, one of the protocol's own
fields the app needs as sent (te, content-type, grpc-timeout, grpc-encoding,
grpc-accept-encoding), or application metadata: user-agent, host, content-length, other
grpc-* keys and the connection-specific fields of RFC 9113 8.2.2 are dropped (grpc clients
let applications send those as metadata), and the sidecar's own user-agent is appended. A
request that is malformed (RFC 9113 8.2.1, 8.3) must be refused, never relayed. Values
with whitespace at an end cross (8.2.1 calls them malformed, but grpc core and grpc-go
servers take them, and gRPC's own spec allows them: the sidecar follows the servers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import hpack
from hypothesis import strategies as st

Field = tuple[bytes, bytes]
PROTOCOL_FIELDS = frozenset(
    {b"te", b"content-type", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"}
)
REQUEST_PSEUDO = (b":method", b":scheme", b":path", b":authority")
# RFC 9113 8.2.2: connection-specific fields (dropped, not refused).
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")  # RFC 9110 5.6.2 tchar, lowercase
_VALUE = re.compile(rb"[\x20-\x7e]*")  # no CR/LF/NUL
# Well within what gRPC servers accept (8 KiB soft limit in grpc core): a list this size
# must never be refused for size.
ORDINARY_LIST_SIZE = 4096
ORDINARY_FIELD_COUNT = 32


DROPPED = frozenset({b"user-agent", b"host", b"content-length"}) | CONNECTION_SPECIFIC


def crosses(name: bytes) -> bool:
    """Whether a field of a well-formed request reaches the app."""
    return (
        name in REQUEST_PSEUDO
        or name in PROTOCOL_FIELDS
        or not (name in DROPPED or name.startswith(b"grpc-"))
    )


def malformed_request(fields: Sequence[Field], *, trailers: bool = False) -> str | None:
    """Why a request (or its trailers) is malformed, or None: RFC 9113 8.2.1 (names: no
    uppercase, controls, space, non-ASCII, colon past a pseudo-header's first byte; values:
    no NUL, CR or LF), 8.2.2 (te other than "trailers"), 8.3 (only a request's four
    pseudo-headers, before the regular fields, each once; :method, :scheme and a non-empty
    :path present; none in trailers); and gRPC's :path, /service/method."""
    seen_regular, pseudo = False, []
    for name, value in fields:
        if b"\x00" in value or b"\r" in value or b"\n" in value:
            return f"NUL, CR or LF in {name!r}"
        if name.startswith(b":"):
            if name not in REQUEST_PSEUDO or seen_regular or trailers or name in pseudo:
                return f"pseudo-header {name!r} misplaced, repeated or unknown"
            if name == b":path" and not re.fullmatch(rb"/[^/?#%]+/[^/?#%]+", value):
                return "a :path that is not /service/method (empty included)"
            pseudo.append(name)
            continue
        seen_regular = True
        if not name or any(b <= 0x20 or 0x41 <= b <= 0x5A or b >= 0x7F or b == 0x3A for b in name):
            return f"field name {name!r}"
        if name == b"te" and value != b"trailers":
            return f"te is {value!r}"
    if not trailers and not all(p in pseudo for p in REQUEST_PSEUDO[:3]):
        return "a required pseudo-header is missing"
    return None


def list_size(fields: Sequence[Field]) -> int:
    """RFC 7541 4.1 / RFC 9113 6.5.2: what SETTINGS_MAX_HEADER_LIST_SIZE counts."""
    return sum(len(name) + len(value) + 32 for name, value in fields)


def _ordinary_fields(fields: Sequence[Field], pseudo: tuple[bytes, ...]) -> bool:
    if len(fields) > ORDINARY_FIELD_COUNT or list_size(fields) > ORDINARY_LIST_SIZE:
        return False
    seen_regular = False
    for name, value in fields:
        if not _VALUE.fullmatch(value):
            return False
        if name.startswith(b":"):
            if seen_regular or name not in pseudo:
                return False
        elif not _TOKEN.fullmatch(name) or name in CONNECTION_SPECIFIC or name == b"host":
            return False
        else:
            seen_regular = True
        if name == b"te" and value != b"trailers":
            return False
    pseudos = [name for name, _ in fields if name.startswith(b":")]
    return len(pseudos) == len(set(pseudos))


def ordinary_request(fields: Sequence[Field], *, trailers: bool = False) -> bool:
    """A request no sidecar may refuse: well-formed by RFC 9113 8.2 and 8.3, and small."""
    if malformed_request(fields, trailers=trailers):
        return False
    paths = [value for name, value in fields if name == b":path"]
    return _ordinary_fields(fields, REQUEST_PSEUDO) and (trailers or paths[0].startswith(b"/"))


def ordinary_response(fields: Sequence[Field]) -> bool:
    """Response headers or trailers no sidecar may refuse."""
    return _ordinary_fields(fields, (b":status",))


_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
tokens = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=15).map(str.encode)
values = st.one_of(
    st.text(_PRINTABLE, max_size=40).map(lambda text: text.strip(" ").encode()),
    st.sampled_from([b"", b"0", b"trailers", b"application/grpc", b"gzip"]),
)
metadata_names = st.one_of(
    tokens,
    tokens.map(lambda name: name + b"-bin"),
    st.sampled_from(  # names the filter drops, or the static table holds
        [b"user-agent", b"grpc-trace-bin", b"grpc-x", b"grpc-status", b"accept", b"cookie"]
    ),
)
# Fields no ordinary request has: refused by a sidecar that validates (RFC 9113 8.2), or
# filtered by one that does not.
odd_fields = st.one_of(
    st.tuples(
        st.sampled_from(
            [b"X-Trace", b"User-Agent", b"GRPC-X", b":x-user", b":status", b"", b"a b", b"a:b"]
        ),
        values,
    ),
    st.tuples(st.sampled_from(sorted(CONNECTION_SPECIFIC | {b"host", b"te"})), values),
    st.tuples(metadata_names, st.sampled_from([b"a\r\nb", b"a\x00", b" lead", b"trail\t"])),
    st.tuples(st.binary(max_size=12), st.binary(max_size=20)),
    st.tuples(metadata_names, st.sampled_from([6000, 17000]).map(lambda n: b"v" * n)),
)


def _wrapped(field: Field, how: int) -> Field:
    """A field as the encoder is given it: plain (indexed), or never indexed (RFC 7541 6.2.3)."""
    return hpack.NeverIndexedHeaderTuple(*field) if how == 1 else field


_PROTOCOL_EXAMPLES = [
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"user-agent", b"grpc-python/1.85.1"),
    (b"grpc-timeout", b"99m"),
    (b"grpc-encoding", b"gzip"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
]
_pseudo = st.tuples(
    st.sampled_from([b"http", b"https"]),
    st.one_of(
        st.builds(lambda *names: b"/%s.%s/%s" % names, tokens, tokens, tokens),
        # Malformed: gRPC's :path is /service/method (and an empty one is malformed anyway).
        st.sampled_from([b"/", b"/index.html", b"", b"kv.KV/Get", b"/kv.KV/Get?x=1", b"//a/b"]),
    ),
    st.sampled_from([None, b"localhost", b"app:50051"]),
)
_protocol = st.lists(st.sampled_from(_PROTOCOL_EXAMPLES), unique=True, max_size=6)
_metadata = st.lists(st.tuples(metadata_names, values), max_size=8)
_odd = st.one_of(st.none(), st.none(), st.tuples(st.integers(0, 1000), odd_fields))
_statuses = st.sampled_from([b"200", b"200", b"404", b"503", b"204", b"500"])
_codes = st.one_of(st.sampled_from([b"0", b"5", b"14"]), st.integers(0, 99).map(b"%d".__mod__))


def _finished(draw: st.DrawFn, fields: list[Field]) -> list[Field]:
    """The fields with, now and then, an odd one among them; each plain or never indexed."""
    odd = draw(_odd)
    if odd is not None:
        fields.insert(odd[0] % (len(fields) + 1), odd[1])
    hows = draw(st.lists(st.integers(0, 3), min_size=len(fields), max_size=len(fields)))
    return [_wrapped(field, how) for field, how in zip(fields, hows, strict=True)]


@st.composite
def requests(draw: st.DrawFn) -> list[Field]:
    """A gRPC request's header list, as a client hands it to its HPACK encoder."""
    scheme, path, authority = draw(_pseudo)
    fields = [(b":method", b"POST"), (b":scheme", scheme), (b":path", path)]
    if authority is not None:
        fields.append((b":authority", authority))
    return _finished(draw, fields + draw(_protocol) + draw(_metadata))


@st.composite
def request_trailers(draw: st.DrawFn) -> list[Field]:
    """Trailers a client sends after its messages (HTTP/2 allows them; gRPC clients rarely)."""
    return _finished(draw, draw(_metadata))


@st.composite
def responses(draw: st.DrawFn) -> list[Field]:
    """Response headers, trailers, or both at once (trailers-only), as a server encodes them."""
    fields: list[Field] = []
    shape = draw(st.sampled_from(["headers", "trailers", "trailers-only"]))
    if shape != "trailers":
        fields += [(b":status", draw(_statuses)), (b"content-type", b"application/grpc")]
    if shape != "headers":
        fields.append((b"grpc-status", draw(_codes)))
        if draw(st.booleans()):
            fields.append((b"grpc-message", draw(values)))
    return _finished(draw, fields + draw(_metadata))
