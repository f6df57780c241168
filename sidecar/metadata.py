"""Which metadata crosses the sidecar, in each direction.

Application metadata (text and `-bin`, repeated keys, in order) passes unchanged.
Dropped: HTTP/2 pseudo-headers; `grpc-*` keys, which are reserved for the
protocol and re-derived by each hop (timeout, encoding); connection-specific
HTTP headers that RFC 9113 section 8.2.2 makes malformed in HTTP/2; and
`user-agent`, which names the sidecar's own upstream client on the next hop.
Responses keep `grpc-status-details-bin`: it is the rich error status
(google.rpc.Status) and belongs to the application.
"""

from __future__ import annotations

from collections.abc import Iterable

Metadata = tuple[tuple[str, str | bytes], ...]

_HOP_BY_HOP = frozenset(
    {
        "te",
        "content-type",
        "user-agent",
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_STATUS_DETAILS = "grpc-status-details-bin"


def _dropped(key: str) -> bool:
    return key.startswith((":", "grpc-")) or key in _HOP_BY_HOP


def crosses_in_request(key: str) -> bool:
    """Whether the caller's metadata key reaches the upstream."""
    return not _dropped(key)


def request_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> Metadata:
    """The caller's metadata as the upstream should receive it."""
    return tuple((key, value) for key, value in metadata if not _dropped(key))


def response_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Metadata:
    """The upstream's headers or trailers as the caller should receive them."""
    if not metadata:
        return ()
    return tuple(
        (key, value) for key, value in metadata if key == _STATUS_DETAILS or not _dropped(key)
    )
