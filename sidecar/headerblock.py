"""HTTP/2 header blocks (HPACK) on the spliced path: filter requests, read trailers, cheaply.

The splice forwards HTTP/2 frames as they are, except header blocks, which it
must read: requests lose the metadata that metadata.py keeps from crossing (and
get the sidecar's user-agent), and responses are read for the method's status.
HPACK's dynamic table would make every block depend on all the blocks before
it, so the splice advertises a table size of 0 to both peers (in SETTINGS).
Once a peer's encoder has applied it, every block stands alone: a scan of its
representations finds the names, and kept representations are copied as they
are. Until then (the first blocks of a connection may be sent before the peer
has seen our SETTINGS) hpack's decoder follows the table, and kept fields are
re-encoded as literals that never touch the upstream's table.
"""

from __future__ import annotations

from collections.abc import Iterator

import hpack
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from sidecar import metadata

_STATIC_NAMES = tuple(name for name, _ in HeaderTable.STATIC_TABLE)
_CACHE_LIMIT = 4096  # distinct encoded names or values remembered; cleared when full
_REWRITTEN_LIMIT = 64  # distinct request blocks remembered per connection
# Only small things are remembered: a caller must not fill the caches with big ones.
_CACHED_STRING_LIMIT = 128  # bytes of an encoded name or value
_CACHED_BLOCK_LIMIT = 2048  # bytes of a request block


class HeaderBlockError(ValueError):
    """A header block that is not valid HPACK (the connection must end)."""


def _integer(block: bytes, position: int, prefix_bits: int) -> tuple[int, int]:
    """RFC 7541 5.1: an integer with an N-bit prefix; returns (value, next position)."""
    if position >= len(block):
        raise HeaderBlockError("header block ends inside an integer")
    mask = (1 << prefix_bits) - 1
    value = block[position] & mask
    position += 1
    if value < mask:  # nearly always: one byte
        return value, position
    shift = 0
    while True:
        if position >= len(block) or shift > 28:
            raise HeaderBlockError("bad integer in header block")
        byte = block[position]
        position += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _string_end(block: bytes, position: int) -> int:
    length, start = _integer(block, position, 7)
    end = start + length
    if end > len(block):
        raise HeaderBlockError("header block ends inside a string")
    return end


_decoded: dict[bytes, bytes] = {}


def _string(block: bytes, position: int) -> tuple[bytes, int]:
    """RFC 7541 5.2: a string literal, Huffman-decoded; returns (text, next position)."""
    if position >= len(block):
        raise HeaderBlockError("header block ends before a string")
    huffman = block[position] & 0x80
    length, start = _integer(block, position, 7)
    end = start + length
    if end > len(block):
        raise HeaderBlockError("header block ends inside a string")
    raw = block[start:end]
    if not huffman:
        return raw, end
    text = _decoded.get(raw)
    if text is None:
        try:
            text = decode_huffman(raw)
        except Exception as error:  # hpack raises its own HPACKDecodingError
            raise HeaderBlockError(f"bad Huffman string: {error}") from None
        if len(raw) <= _CACHED_STRING_LIMIT:
            if len(_decoded) >= _CACHE_LIMIT:
                _decoded.clear()
            _decoded[raw] = text
    return text, end


def _fields(block: bytes) -> Iterator[tuple[bytes, int, int, int]]:
    """Each representation of a stateless block: (name, start, end, value start).

    Table size updates come out with the name b"" so that callers keep them.
    A reference to the dynamic table raises HeaderBlockError: stateless blocks
    have none.
    """
    position, size = 0, len(block)
    while position < size:
        start, first = position, block[position]
        if first & 0x80:  # indexed field
            index, position = _integer(block, position, 7)
            if not 1 <= index <= len(_STATIC_NAMES):
                raise HeaderBlockError(f"header block refers to table entry {index}")
            yield _STATIC_NAMES[index - 1], start, position, -1
            continue
        if first & 0xE0 == 0x20:  # dynamic table size update
            _, position = _integer(block, position, 5)
            yield b"", start, position, -1
            continue
        prefix = 6 if first & 0x40 else 4  # literal with, or without / never, indexing
        index, position = _integer(block, position, prefix)
        if index:
            if index > len(_STATIC_NAMES):
                raise HeaderBlockError(f"header block refers to table entry {index}")
            name = _STATIC_NAMES[index - 1]
        else:
            name, position = _string(block, position)
        value_start = position
        position = _string_end(block, position)
        yield name, start, position, value_start


def _filter_stateless(block: bytes) -> tuple[list[bytes], bytes | None]:
    """The kept runs of a stateless request block, and its :path.

    _fields, unrolled: this runs once per call on the hot path, so integers of
    one byte (nearly all of them) are read inline.
    """
    kept: list[bytes] = []
    path = None
    position, copied, size = 0, 0, len(block)
    while position < size:
        start, first = position, block[position]
        if first & 0x80:  # indexed field
            index = first & 0x7F
            position += 1
            if index == 0x7F:
                index, position = _integer(block, start, 7)
            if not 1 <= index <= len(_STATIC_NAMES):
                raise HeaderBlockError(f"header block refers to table entry {index}")
            name, value = HeaderTable.STATIC_TABLE[index - 1]
            if name == b":path":
                path = value
            if not _request_keeps(name):
                kept.append(block[copied:start])
                copied = position
            continue
        if first & 0xE0 == 0x20:  # dynamic table size update: kept
            _, position = _integer(block, position, 5)
            continue
        mask = 0x3F if first & 0x40 else 0x0F
        index = first & mask
        position += 1
        if index == mask:
            index, position = _integer(block, start, 6 if mask == 0x3F else 4)
        if index:
            if index > len(_STATIC_NAMES):
                raise HeaderBlockError(f"header block refers to table entry {index}")
            name = _STATIC_NAMES[index - 1]
        else:
            name, position = _string(block, position)
        if name == b":path":
            path, position = _string(block, position)
        else:
            if position >= size:
                raise HeaderBlockError("header block ends inside a string")
            length = block[position] & 0x7F
            position += 1
            if length == 0x7F:
                length, position = _integer(block, position - 1, 7)
            position += length
            if position > size:
                raise HeaderBlockError("header block ends inside a string")
        if not _request_keeps(name):
            kept.append(block[copied:start])
            copied = position
    kept.append(block[copied:])
    return kept, path


def _literal(name: bytes, value: bytes, *, never_indexed: bool = False) -> bytes:
    """A literal field without indexing (or never indexed), new name, no Huffman:
    touches no table."""
    prefix = b"\x10" if never_indexed else b"\x00"
    return prefix + _length(len(name)) + name + _length(len(value)) + value


def _length(value: int) -> bytes:
    if value < 0x7F:
        return bytes((value,))
    encoded, value = bytearray((0x7F,)), value - 0x7F
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _starts_with_table_reset(block: bytes) -> bool:
    """Whether the block opens with size updates ending at 0 (the encoder has emptied its table)."""
    position, reset = 0, False
    while position < len(block) and block[position] & 0xE0 == 0x20:
        size, position = _integer(block, position, 5)
        reset = size == 0
    return reset


_KEEP_IN_REQUESTS = frozenset({b"te", b"content-type", b"grpc-timeout", b"grpc-encoding",
                               b"grpc-accept-encoding"})  # fmt: skip


_request_decisions: dict[bytes, bool] = {}


def _request_keeps(name: bytes) -> bool:
    """Which request fields cross: pseudo-headers and the protocol's own fields, as sent
    (the splice forwards the message bytes unchanged, so their encoding and the caller's
    deadline still hold), and the application metadata that metadata.py lets through."""
    decision = _request_decisions.get(name)
    if decision is None:
        # HTTP/2 names are lowercase (RFC 9113 8.2.1); one that is not is judged by its
        # lowercase form, so that "User-Agent" or "GRPC-X" cannot slip past the filter.
        lowered = name.lower()
        decision = (
            lowered.startswith(b":")
            or lowered in _KEEP_IN_REQUESTS
            or metadata.crosses_in_request(lowered.decode("latin-1"))
        )
        if len(name) <= _CACHED_STRING_LIMIT:
            if len(_request_decisions) >= _CACHE_LIMIT:
                _request_decisions.clear()
            _request_decisions[name] = decision
    return decision


class RequestBlocks:
    """One connection's request header blocks, client to upstream."""

    def __init__(self, user_agent: bytes) -> None:
        self._decoder: hpack.Decoder | None = hpack.Decoder()
        self._limited = False
        self._user_agent = _literal(b"user-agent", user_agent)
        # Once blocks stand alone, a client sends the same bytes for the same method
        # and metadata: remember recent answers.
        self._rewritten: dict[bytes, tuple[bytes, bytes | None]] = {}

    def table_limited(self) -> None:
        """The client has acknowledged a SETTINGS_HEADER_TABLE_SIZE of 0: its table can no
        longer grow, and the block that opens with the reset to 0 ends the stateful phase.
        (Before that, a reset could be followed by growth again.)"""
        self._limited = True

    def rewrite(self, block: bytes) -> tuple[bytes, bytes | None]:
        """The block as the upstream gets it, and the request's :path."""
        if self._decoder is not None and self._limited and _starts_with_table_reset(block):
            self._decoder = None  # from here on the client's blocks stand alone
        if self._decoder is not None:
            return self._rewrite_stateful(self._decoder, block)
        known = self._rewritten.get(block)
        if known is not None:
            return known
        kept, path = _filter_stateless(block)
        kept.append(self._user_agent)
        answer = b"".join(kept), path
        if len(block) <= _CACHED_BLOCK_LIMIT:
            if len(self._rewritten) >= _REWRITTEN_LIMIT:
                self._rewritten.clear()
            self._rewritten[block] = answer
        return answer

    def _rewrite_stateful(self, decoder: hpack.Decoder, block: bytes) -> tuple[bytes, bytes | None]:
        try:
            decoded = decoder.decode(block, raw=True)
        except Exception as error:  # hpack's HPACKError and friends
            raise HeaderBlockError(f"bad request header block: {error}") from None
        parts, path = [], None
        for decoded_field in decoded:
            name, value = decoded_field
            if name == b":path":
                path = value
            if _request_keeps(name):
                # RFC 7541 6.2.3: a field the client marked never-indexed stays so.
                never = isinstance(decoded_field, hpack.NeverIndexedHeaderTuple)
                parts.append(_literal(name, value, never_indexed=never))
        parts.append(self._user_agent)
        return b"".join(parts), path


class ResponseBlocks:
    """One connection's response header blocks, upstream to client, read for grpc-status."""

    def __init__(self) -> None:
        self._decoder: hpack.Decoder | None = hpack.Decoder()
        self._limited = False

    @property
    def follows_table(self) -> bool:
        """Whether every block must still be read (the upstream may still use its table)."""
        return self._decoder is not None

    def table_limited(self) -> None:
        """The upstream has acknowledged a SETTINGS_HEADER_TABLE_SIZE of 0 (see RequestBlocks)."""
        self._limited = True

    def status(self, block: bytes) -> tuple[bytes | None, bytes | None]:
        """The block's grpc-status and :status values, each if it has one (trailers carry
        grpc-status; response headers carry :status, and grpc-status when trailers-only)."""
        if self._decoder is not None and self._limited and _starts_with_table_reset(block):
            self._decoder = None
        grpc_status = http_status = None
        if self._decoder is not None:
            try:
                decoded = self._decoder.decode(block, raw=True)
            except Exception as error:
                raise HeaderBlockError(f"bad response header block: {error}") from None
            for name, value in decoded:
                if name == b"grpc-status":
                    grpc_status = value
                elif name == b":status":
                    http_status = value
            return grpc_status, http_status
        for name, start, _, value_start in _fields(block):
            if name == b"grpc-status":
                grpc_status = _string(block, value_start)[0]
            elif name == b":status":
                if value_start < 0:  # indexed: the value is the static table's
                    http_status = HeaderTable.STATIC_TABLE[_integer(block, start, 7)[0] - 1][1]
                else:
                    http_status = _string(block, value_start)[0]
        return grpc_status, http_status
