"""HTTP/2 header blocks (HPACK) on the spliced path: filter requests, read trailers, cheaply.

The splice forwards HTTP/2 frames as they are, except header blocks, which it
must read: requests lose the fields the route's header rules keep from crossing
(auth/headers.py, handed in as a RequestFilter: this module imports no rules) and
get the sidecar's user-agent, and responses are read for the method's status.
HPACK's dynamic table would make every block depend on all the blocks before
it, so the splice advertises a table size of 0 to both peers (in SETTINGS).
Once a peer's encoder has applied it, every block stands alone: a scan of its
representations finds the names, and kept representations are copied as they
are. Until then (the first blocks of a connection may be sent before the peer
has seen our SETTINGS) hpack's decoder follows the table, and kept fields are
re-encoded as literals that never touch the upstream's table.

Every request field is judged on the way (the route's rules): a request
larger than the header-list budget, with too many fields, or malformed (RFC 9113
8.2) raises RequestRefused, and the splice answers it itself; it never reaches
the upstream. Until a client's table is empty each block is decoded and
re-encoded, so the decoded bytes a connection may send in that phase are
bounded too (a few indexed bytes could otherwise stand for megabytes: HPACK
amplification).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import grpc
import hpack
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

_STATIC_NAMES = tuple(name for name, _ in HeaderTable.STATIC_TABLE)
_CACHE_LIMIT = 4096  # distinct encoded names or values remembered; cleared when full
# Request blocks a connection remembers with their answers, in bytes: a client's blocks
# differ in their deadline (grpc-timeout) alone, among a few dozen values under steady
# load (a Go client's: 38 in 300 calls; a cache of 16 missed 9 calls in 10). The oldest
# are forgotten first. Each entry is counted with its objects' overhead (~200 bytes).
_REWRITTEN_BYTES = 32 * 1024
_ENTRY_OVERHEAD = 200
# Only small things are remembered: a caller must not fill the caches with big ones.
_CACHED_STRING_LIMIT = 128  # bytes of an encoded name or value
_CACHED_BLOCK_LIMIT = 512  # bytes of a request block


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


# Huffman decodings, process-wide: a pure function of the bytes, whatever the rules.
_decoded: dict[bytes, bytes] = {}

# What a stateless response block says (grpc-status, :status), by its bytes: an app
# sends the same response headers and trailers call after call, so reading the status
# for the access log and the metrics is one lookup (scanning a block costs ~10 us).
_statuses: dict[bytes, tuple[bytes | None, bytes | None]] = {}
_STATUS_CACHE_LIMIT = 1024  # distinct blocks remembered; cleared when full
_STATUS_BLOCK_LIMIT = 256  # bytes of a response block


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


def _literal_name(block: bytes, position: int) -> tuple[bytes, int]:
    """A literal representation's name (RFC 7541 6.2), from the static table or a string,
    for the one starting at position; returns (name, where its value starts)."""
    prefix = 6 if block[position] & 0x40 else 4  # with, or without / never, indexing
    index, position = _integer(block, position, prefix)
    if not index:
        return _string(block, position)
    if index > len(_STATIC_NAMES):
        raise HeaderBlockError(f"header block refers to table entry {index}")
    return _STATIC_NAMES[index - 1], position


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
        name, position = _literal_name(block, position)
        value_start = position
        position = _string_end(block, position)
        yield name, start, position, value_start


class FieldRules(Protocol):
    """A route's header rules, as the filter asks them (auth/headers.py's HeaderRules)."""

    user_agent: str

    def judge_request_field(self, name: bytes, value: bytes) -> tuple[bool, str | None]:
        """Whether the field crosses, and what makes the request malformed (or None)."""
        ...


class RequestFilter:
    """A route's request-header filter: its rules, and the judgements of the stateless
    field representations its callers sent lately (shared by the route's connections).

    A stateless representation means the same wherever it appears (only the static table
    is in play), and a client repeats the same fields call after call: judgements are
    remembered by the representation's bytes, and only fields that change (a deadline)
    are decoded again.
    """

    def __init__(self, rules: FieldRules) -> None:
        self.rules = rules
        self.user_agent_field = _literal(b"user-agent", rules.user_agent.encode())
        self.judged: dict[bytes, _Judgement] = {}

    def judge(self, name: bytes, value: bytes) -> _Judgement:
        """One request field on its own, by the route's rules (see _Judgement)."""
        kept, problem = self.rules.judge_request_field(name, value)
        path = value if name == b":path" else None
        return _Judgement(name, path, len(name) + len(value) + 32, kept, problem)

    def judge_representation(self, block: bytes, start: int, end: int) -> _Judgement:
        """Decode and judge the representation block[start:end] (an indexed field or a
        literal, its extent already measured), and remember the judgement."""
        first = block[start]
        if first & 0x80:
            index = _integer(block, start, 7)[0]
            if not 1 <= index <= len(_STATIC_NAMES):
                raise HeaderBlockError(f"header block refers to table entry {index}")
            name, value = HeaderTable.STATIC_TABLE[index - 1]
        else:
            name, position = _literal_name(block, start)
            value = _string(block, position)[0]
        judged = self.judge(name, value)
        if end - start <= _CACHED_REPRESENTATION_LIMIT:
            if len(self.judged) >= _CACHE_LIMIT:
                self.judged.clear()
            self.judged[block[start:end]] = judged
        return judged


def _filter_stateless(
    block: bytes, request_filter: RequestFilter
) -> tuple[list[bytes], list[_Judgement]]:
    """The kept runs of a stateless request block, and the judgement of each of its fields.

    This runs once per call on the hot path: each representation is measured (integers
    of one byte, nearly all of them, read inline) and its judgement looked up by its
    bytes; only a representation not seen lately is decoded (RequestFilter.judged).
    """
    remembered = request_filter.judged
    kept: list[bytes] = []
    fields: list[_Judgement] = []
    position, copied, size = 0, 0, len(block)
    while position < size:
        start, first = position, block[position]
        if first & 0x80:  # indexed field
            position += 1
            if first == 0xFF:
                position = _integer(block, start, 7)[1]
        elif first & 0xE0 == 0x20:  # dynamic table size update: kept, if it says 0
            table_size, position = _integer(block, position, 5)
            if table_size or fields:  # (check_size_updates has counted them)
                raise HeaderBlockError(
                    "a table size update after a field, or above the 0 the sidecar allows"
                )
            continue
        else:  # literal with, or without / never, indexing
            mask = 0x3F if first & 0x40 else 0x0F
            position += 1
            if first & mask == mask:
                position = _integer(block, start, 6 if mask == 0x3F else 4)[1]
            if not first & mask:  # the name is a string too
                length = block[position] & 0x7F if position < size else 0x7F
                position = position + 1 + length if length < 0x7F else _string_end(block, position)
            length = block[position] & 0x7F if position < size else 0x7F
            position = position + 1 + length if length < 0x7F else _string_end(block, position)
            if position > size:
                raise HeaderBlockError("header block ends inside a string")
        judged = remembered.get(block[start:position])
        if judged is None:
            judged = request_filter.judge_representation(block, start, position)
        fields.append(judged)
        if not judged.kept:
            kept.append(block[copied:start])
            copied = position
    kept.append(block[copied:])
    return kept, fields


class _Judgement(NamedTuple):
    """What one request field is, on its own (by the route's rules)."""

    name: bytes
    path: bytes | None  # its value, when the name is :path
    size: int  # in the header list (RFC 9113 6.5.2)
    kept: bool  # it crosses
    problem: str | None  # what makes the request malformed


_CACHED_REPRESENTATION_LIMIT = 256  # bytes


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


_STATUS_200 = b"\x88"  # the static table's :status 200
_GRPC_CONTENT_TYPE = _literal(b"content-type", b"application/grpc")
# A gRPC response's headers, when the sidecar answers a call with messages of its own
# (splice/health.py). Touches no table.
RESPONSE_HEADERS = _STATUS_200 + _GRPC_CONTENT_TYPE


def grpc_message(details: str) -> bytes:
    """The grpc-message value for details: percent-encoded UTF-8, as the gRPC spec says."""
    encoded = bytearray()
    for byte in details.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:  # printable ASCII except '%'
            encoded.append(byte)
        else:
            encoded += b"%%%02X" % byte
    return bytes(encoded)


def status_block(code: int, details: str, *, trailers_only: bool) -> bytes:
    """A response header block ending a call with a gRPC status, as a server sends it: the
    trailers of a response already begun, or (trailers_only) the whole response. Touches
    no table, so it fits any point of any connection."""
    message = grpc_message(details)
    fields = _literal(b"grpc-status", str(code).encode()) + _literal(b"grpc-message", message)
    if trailers_only:
        return _STATUS_200 + _GRPC_CONTENT_TYPE + fields
    return fields


def check_size_updates(block: bytes) -> None:
    """RFC 7541 4.2: a block opens with at most two dynamic table size updates (the lowest
    size since the last block, then the final one). Raises HeaderBlockError for more: each
    is one byte that costs a decoder a step (16,000 of them made one block cost 30 ms)."""
    position, count = 0, 0
    while position < len(block) and block[position] & 0xE0 == 0x20:
        count += 1
        if count > 2:
            raise HeaderBlockError("more than two table size updates at the start of a block")
        position = _integer(block, position, 5)[1]


def _starts_with_table_reset(block: bytes) -> bool:
    """Whether the block opens with size updates ending at 0 (the encoder has emptied its table)."""
    position, reset = 0, False
    while position < len(block) and block[position] & 0xE0 == 0x20:
        size, position = _integer(block, position, 5)
        reset = size == 0
    return reset


class RequestRefused(Exception):
    """A request the splice answers itself, with this status and details, instead of
    relaying it (too large, or malformed: RFC 9113 8.2); the connection goes on."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _check_request(
    fields: list[_Judgement], limits: HeaderLimits, trailers: bool, reserved: int = 0
) -> bytes | None:
    """The request's :path; raises RequestRefused for a request the splice answers itself:
    too many fields, too large (counting `reserved` bytes the splice adds), or malformed
    (RFC 9113 8.2, 8.3)."""
    if len(fields) > limits.max_fields:
        raise RequestRefused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request has more than {limits.max_fields} header fields",
        )
    path = None
    list_size = 0
    pseudo: list[bytes] = []
    regular = trailers  # trailers hold no pseudo-header
    for name, field_path, size, _, problem in fields:
        list_size += size
        if problem:
            raise RequestRefused(grpc.StatusCode.INTERNAL, f"malformed request: {problem}")
        if name[:1] != b":":
            regular = True
            continue
        if regular:
            problem = f"pseudo-header {name.decode()} after regular fields"
        elif name in pseudo:
            problem = f"pseudo-header {name.decode()} twice"
        if problem:
            raise RequestRefused(grpc.StatusCode.INTERNAL, f"malformed request: {problem}")
        pseudo.append(name)
        path = field_path if field_path is not None else path
    if list_size + reserved > limits.list_size:
        raise RequestRefused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request headers are larger than {limits.list_size} bytes",
        )
    if not trailers:
        for required in (b":method", b":scheme", b":path"):
            if required not in pseudo:
                raise RequestRefused(
                    grpc.StatusCode.INTERNAL,
                    f"malformed request: no {required.decode()} pseudo-header",
                )
    return path


@dataclass
class HeaderLimits:
    """What one request's header list may hold (max_header_list_size, max_header_fields),
    and how many decoded bytes a connection may send while its HPACK table is in use."""

    list_size: int = 16384
    max_fields: int = 256
    stateful_bytes: int = 1024 * 1024
    # A block larger than this is answered RESOURCE_EXHAUSTED unread (HPACK may compress
    # a list, not grow it much: a block far larger than the list it may stand for is
    # padding or an attack); while the client's table is in use, it ends the connection.
    block_size: int = 32768


class RequestBlocks:
    """One connection's request header blocks, client to upstream."""

    __slots__ = (
        "_decoder", "_filter", "_injected", "_limited", "_reserved", "_rewritten",
        "_rewritten_bytes", "_stateful_left", "limits",
    )  # fmt: skip

    def __init__(
        self,
        request_filter: RequestFilter,
        limits: HeaderLimits | None = None,
        injected: tuple[bytes, bytes] | None = None,
    ) -> None:
        self._filter = request_filter
        self.limits = limits if limits is not None else HeaderLimits()
        # A field this connection's requests carry to the upstream besides the user-agent
        # (the caller's identity): encoded once, counted toward the header-list budget.
        self._injected = b""
        self._reserved = 0
        if injected is not None:
            self._injected = _literal(*injected)
            self._reserved = len(injected[0]) + len(injected[1]) + 32  # RFC 7541 4.1
        self._decoder: hpack.Decoder | None = hpack.Decoder()
        self._decoder.max_header_list_size = self.limits.list_size
        self._stateful_left = self.limits.stateful_bytes
        self._limited = False
        # Once blocks stand alone, a client sends the same bytes for the same method
        # and metadata: remember recent answers (only requests that crossed).
        self._rewritten: dict[bytes, tuple[bytes, bytes | None]] = {}
        self._rewritten_bytes = 0

    def lower_list_size(self, size: int) -> None:
        """The upstream accepts header lists of at most `size` bytes (its SETTINGS): a request
        larger than that is answered here rather than refused by the upstream."""
        if size < self.limits.list_size:
            self.limits.list_size = size
            self._rewritten.clear()
            self._rewritten_bytes = 0
            if self._decoder is not None:
                self._decoder.max_header_list_size = size

    def table_limited(self) -> None:
        """The client has acknowledged a SETTINGS_HEADER_TABLE_SIZE of 0: its table can no
        longer grow, and the block that opens with the reset to 0 ends the stateful phase.
        (Before that, a reset could be followed by growth again.)"""
        self._limited = True

    def rewrite(self, block: bytes, *, trailers: bool = False) -> tuple[bytes, bytes | None]:
        """The block as the upstream gets it, and the request's :path.

        Raises RequestRefused for a request to answer here (the connection goes on),
        HeaderBlockError for a block that ends the connection.
        """
        if self._decoder is None and not trailers:
            known = self._rewritten.get(block)
            if known is not None:  # the same bytes passed every check below
                return known
        check_size_updates(block)
        if self._decoder is not None and self._limited and _starts_with_table_reset(block):
            self._decoder = None  # from here on the client's blocks stand alone
        if len(block) > self.limits.block_size:
            if self._decoder is not None:  # it must be decoded to keep the table in step
                raise HeaderBlockError(
                    f"a request header block of {len(block)} bytes while the HPACK table is in use"
                )
            raise RequestRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request headers larger than {self.limits.list_size} bytes",
            )
        if self._decoder is not None:
            return self._rewrite_stateful(self._decoder, block, trailers)
        kept, fields = _filter_stateless(block, self._filter)
        path = _check_request(fields, self.limits, trailers, 0 if trailers else self._reserved)
        if not trailers:
            kept.append(self._filter.user_agent_field)
            kept.append(self._injected)
        answer = b"".join(kept), path
        if len(block) <= _CACHED_BLOCK_LIMIT and not trailers:
            self._remember(block, answer)
        return answer

    def _remember(self, block: bytes, answer: tuple[bytes, bytes | None]) -> None:
        size = _entry_size(block, answer)
        if size > _REWRITTEN_BYTES:
            return
        remembered = self._rewritten
        self._rewritten_bytes += size
        while self._rewritten_bytes > _REWRITTEN_BYTES:
            oldest = next(iter(remembered))
            self._rewritten_bytes -= _entry_size(oldest, remembered.pop(oldest))
        remembered[block] = answer

    def _rewrite_stateful(
        self, decoder: hpack.Decoder, block: bytes, trailers: bool
    ) -> tuple[bytes, bytes | None]:
        try:
            decoded = decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError:
            # The table may now be out of step with the client's: the connection ends.
            raise HeaderBlockError(
                f"request headers larger than {self.limits.list_size} bytes while the "
                "HPACK table is in use"
            ) from None
        except Exception as error:  # hpack's HPACKError and friends
            raise HeaderBlockError(f"bad request header block: {error}") from None
        # Each block is re-encoded as literals until the client's table is empty: a
        # client that never empties it could make a few bytes stand for a lot.
        self._stateful_left -= sum(len(name) + len(value) for name, value in decoded)
        if self._stateful_left < 0:
            raise HeaderBlockError(
                f"more than {self.limits.stateful_bytes} bytes of request headers before "
                "the client applied a header table size of 0"
            )
        fields = [self._filter.judge(name, value) for name, value in decoded]
        path = _check_request(fields, self.limits, trailers, 0 if trailers else self._reserved)
        parts = [
            # RFC 7541 6.2.3: a field the client marked never-indexed stays so.
            _literal(*field, never_indexed=isinstance(field, hpack.NeverIndexedHeaderTuple))
            for field, judged in zip(decoded, fields, strict=True)
            if judged.kept
        ]
        if not trailers:
            parts.append(self._filter.user_agent_field)
            parts.append(self._injected)
        return b"".join(parts), path


def _entry_size(block: bytes, answer: tuple[bytes, bytes | None]) -> int:
    """What remembering a request block costs: its bytes, the rewritten block's, the decoded
    :path's, and the objects' overhead."""
    rewritten, path = answer
    return len(block) + len(rewritten) + len(path or b"") + _ENTRY_OVERHEAD


class ResponseBlocks:
    """One connection's response header blocks, upstream to client, read for grpc-status."""

    __slots__ = ("_decoder", "_limited", "follows_table")

    def __init__(self) -> None:
        self._decoder: hpack.Decoder | None = hpack.Decoder()
        self._limited = False
        # Whether every block must still be read (the upstream may still use its table).
        self.follows_table = True

    def table_limited(self) -> None:
        """The upstream has acknowledged a SETTINGS_HEADER_TABLE_SIZE of 0 (see RequestBlocks)."""
        self._limited = True

    def status(self, block: bytes) -> tuple[bytes | None, bytes | None]:
        """The block's grpc-status and :status values, each if it has one (trailers carry
        grpc-status; response headers carry :status, and grpc-status when trailers-only)."""
        if self._decoder is None:
            known = _statuses.get(block)
            if known is not None:
                return known
        check_size_updates(block)
        if self._decoder is not None and self._limited and _starts_with_table_reset(block):
            self._decoder = None
            self.follows_table = False
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
        if len(block) <= _STATUS_BLOCK_LIMIT:
            if len(_statuses) >= _STATUS_CACHE_LIMIT:
                _statuses.clear()
            _statuses[block] = (grpc_status, http_status)
        return grpc_status, http_status
