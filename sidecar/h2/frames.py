"""HTTP/2 frames on the spliced path: passed on as they are, except the few the sidecar must see.

A FrameWalker reads one direction of a connection. Frame headers are parsed so
that frame boundaries are known, and the bytes of most frames (DATA,
WINDOW_UPDATE, RST_STREAM, GOAWAY, PRIORITY, and PING unless a `ping` callback
takes them) go out untouched, in runs as long as the input allows. Three kinds
are looked at:
- SETTINGS: HEADER_TABLE_SIZE is set to 0 in every one, so that each peer's
  encoder ends up with no dynamic table (see headerblock.py);
- HEADERS and CONTINUATION: the whole header block is handed to the direction's
  `headers` callback, which returns the block to send on (requests are filtered;
  responses go on unchanged);
- RST_STREAM, and DATA or HEADERS ending a stream: reported to callbacks, for
  the access log;
- GOAWAY, with a `goaway` callback: its last stream id is reported (the frame
  goes on unchanged), so that the splice's own GOAWAYs never name a higher one.
Flow control is left to the two peers: DATA frames and WINDOW_UPDATEs cross
unchanged, so the windows they advertise stay true end to end.

A stream whose request block the `headers` callback answers with `DROP` (the
splice answered it itself: a request it refused) never reaches the other side:
its later frames are left out too, and the flow-controlled length of its DATA is
reported (`dropped_data`), for the splice to give the sender its window back.

The walker also keeps the budgets a hostile peer could exhaust within reach of
the connection that owns it (sans-IO: it counts, the connection enforces): it
walks at most `frames_per_pass` frames and `block_bytes_per_pass` header-block
bytes per call of `feed`, keeping the rest (`backlog`) for the next call, so one
read of tiny frames cannot hold the event loop; it counts control frames (the
ones that cost the receiver work and carry no request: PING and SETTINGS, ACKs
included, PRIORITY, RST_STREAM, WINDOW_UPDATE, empty DATA, frames of unknown types)
and frames that
carry data (DATA with a payload, HEADERS); and it bounds what it holds of a
frame or header block to `max_block` bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_INITIAL_WINDOW_SIZE = 0x4

_HEADER = 9
# A frame header in one call: its length (high byte, low 16 bits), type, flags, stream id
# (with the reserved bit), a third of the time reading them one by one takes.
_FRAME_HEADER = struct.Struct(">BHBBI")
_unpack_frame_header = _FRAME_HEADER.unpack_from
_pack_frame_header = _FRAME_HEADER.pack
# A 4-byte field: a WINDOW_UPDATE's increment, an RST_STREAM's error code.
_unpack_u32 = struct.Struct(">I").unpack_from
_WHOLE_BLOCK_MASK = END_HEADERS | PADDED | PRIORITY_FLAG
_MAX_OUTPUT_FRAME = 16384  # the smallest SETTINGS_MAX_FRAME_SIZE a peer may have
# A header block (or another frame read whole) larger than this ends the connection:
# gRPC servers refuse header lists far smaller (grpc core: 16 KiB), and the bound
# also bounds what is held of a frame that arrives a few bytes at a time.
_MAX_HEADER_BLOCK = 256 * 1024
_MAX_FRAGMENTS = 1024  # CONTINUATION frames in one header block
# Entries in one SETTINGS frame: a few are defined, and each costs a step to rewrite (a
# 16 KiB SETTINGS frame cost 2.5 ms at one control frame's price); nghttp2's default.
MAX_SETTINGS_ENTRIES = 32
_MAX_DROPPED = 1024  # dropped streams remembered (their late frames are left out)
_NOT_HELD, _HELD, _HELD_ENDED = 0, 1, 2  # a dropped stream's state (see FrameWalker.drop)
_TABLE_SIZE_ZERO = SETTINGS_HEADER_TABLE_SIZE.to_bytes(2, "big") + bytes(4)

SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
# grpc core's "true binary metadata" extension: -bin values sent raw (NUL first) instead
# of base64. Not HTTP/2 (RFC 9113 8.2.1 forbids NUL, CR and LF in values): the splice
# keeps it from being negotiated through it, so values stay checkable on the way.
SETTINGS_GRPC_TRUE_BINARY = 0xFE03
_FRAMES_PER_PASS = 1000  # about a millisecond of walking
_BLOCK_BYTES_PER_PASS = 32 * 1024  # a few milliseconds of header-block scanning


class _Drop:
    """The answer of a `headers` callback that drops the stream (see the module doc)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()

# (stream id, flags, buffer, start, end) for the header block buffer[start:end]
# -> the block to send instead, None to send it unchanged, or DROP
HeadersCallback = Callable[[int, int, bytes, int, int], "bytes | _Drop | None"]
# (stream id) for a stream one side ended with END_STREAM on DATA, once that frame has
# been passed whole
StreamCallback = Callable[[int], None]
# (stream id, buffer, start, end): DATA payload bytes buffer[start:end], padding excluded;
# a frame that arrives in pieces is reported piece by piece
DataCallback = Callable[[int, bytes, int, int], None]
# (stream id, error code)
ResetCallback = Callable[[int, int], None]
# (last stream id) of a GOAWAY the peer sent (the frame itself is passed on unchanged)
GoawayCallback = Callable[[int], None]
# (opaque data) of a PING the peer sent, to be answered by the caller of feed
PingCallback = Callable[[bytes], None]
# () when the peer acknowledges a SETTINGS frame (each of ours carries HEADER_TABLE_SIZE 0)
# -> False to leave the ACK out (it acknowledges nothing the other side sent), else relayed
AckCallback = Callable[[], "bool | None"]
# (the peer's SETTINGS_MAX_HEADER_LIST_SIZE) when a SETTINGS frame of the peer sets it
HeaderListCallback = Callable[[int], None]
# (flow-controlled bytes) of DATA left out because its stream was dropped
DroppedCallback = Callable[[int], None]


class FrameError(ValueError):
    """The peer broke HTTP/2 framing: the splice closes both connections."""


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    length = len(payload)
    return _pack_frame_header(length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


# The first GOAWAY of RFC 9113's graceful pair (6.8): "shutting down; finish what you
# started, start nothing new" (the highest stream id possible, no error).
GOAWAY_GRACEFUL = frame(GOAWAY, 0, 0, (2**31 - 1).to_bytes(4, "big") + bytes(4))


def header_frames(stream_id: int, end_stream: bool, block: bytes) -> bytes:
    """A header block as HEADERS (+ CONTINUATION) frames no larger than any peer accepts."""
    if len(block) <= _MAX_OUTPUT_FRAME:  # the usual case: one frame
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        return frame(HEADERS, flags, stream_id, block)
    first, rest = block[:_MAX_OUTPUT_FRAME], block[_MAX_OUTPUT_FRAME:]
    flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
    frames = [frame(HEADERS, flags, stream_id, first)]
    while rest:
        chunk, rest = rest[:_MAX_OUTPUT_FRAME], rest[_MAX_OUTPUT_FRAME:]
        frames.append(frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, chunk))
    return b"".join(frames)


def _rewritten_settings(
    payload: bytes, header_list_limit: int | None, header_list: HeaderListCallback | None
) -> bytes:
    """SETTINGS entries with HEADER_TABLE_SIZE replaced by, or extended with, 0, and, with a
    header_list_limit, MAX_HEADER_LIST_SIZE lowered to it (or added): the receiver learns
    the sidecar's limit, and a client that honours it fails early with a clear error.
    grpc core's true-binary setting is left out (see SETTINGS_GRPC_TRUE_BINARY)."""
    if len(payload) % 6:
        raise FrameError("SETTINGS frame length is not a multiple of 6")
    if len(payload) > 6 * MAX_SETTINGS_ENTRIES:
        raise FrameError(
            f"SETTINGS frame of {len(payload) // 6} entries (at most {MAX_SETTINGS_ENTRIES})"
        )
    kept = []
    for offset in range(0, len(payload), 6):
        identifier = int.from_bytes(payload[offset : offset + 2], "big")
        if identifier in (SETTINGS_HEADER_TABLE_SIZE, SETTINGS_GRPC_TRUE_BINARY):
            continue
        if identifier == SETTINGS_MAX_HEADER_LIST_SIZE:
            value = int.from_bytes(payload[offset + 2 : offset + 6], "big")
            if header_list is not None:
                header_list(value)
            if header_list_limit is not None:
                continue  # replaced below by the lower of the two
        kept.append(payload[offset : offset + 6])
    kept.append(_TABLE_SIZE_ZERO)
    if header_list_limit is not None:
        for offset in range(0, len(payload), 6):
            if int.from_bytes(payload[offset : offset + 2], "big") == SETTINGS_MAX_HEADER_LIST_SIZE:
                value = int.from_bytes(payload[offset + 2 : offset + 6], "big")
                header_list_limit = min(header_list_limit, value)
        kept.append(
            SETTINGS_MAX_HEADER_LIST_SIZE.to_bytes(2, "big") + header_list_limit.to_bytes(4, "big")
        )
    return b"".join(kept)


def header_fragment(flags: int, payload: bytes) -> bytes:
    """A HEADERS frame's header block fragment: padding and priority fields removed."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload:
            raise FrameError("padded HEADERS frame without a pad length")
        start, end = 1, end - payload[0]
    if flags & PRIORITY_FLAG:
        start += 5
    if start > end:
        raise FrameError("HEADERS padding or priority longer than the frame")
    return payload[start:end]


class FrameWalker:
    """One direction of a spliced HTTP/2 connection: `feed` bytes in, get bytes to send on.

    With `preface`, the direction starts with the client connection preface, which
    must be exactly that (anything else is not HTTP/2). With `ping`, PING frames are
    taken out of the stream and handed to it, for the splice to answer: a PING is
    about one connection, and answering it where it arrives spares a crossing and
    a wake-up of the other side for every ping (gRPC clients and servers send one
    per burst of data, to estimate the bandwidth-delay product). The peer's ACKs are
    taken out too: they answer pings of this side's own (`ping_acked`), never relayed.
    """

    # Two per connection: slots, not a __dict__ (1.6 KiB each for an idle connection).
    __slots__ = (
        "_awaiting", "_block", "_block_bytes_per_pass", "_block_size", "_data",
        "_dropped_data", "_ended", "_first_frame_done", "_frames_per_pass", "_goaway",
        "_header_list", "_header_list_limit", "_headers", "_held_window", "_max_block",
        "_passing", "_passing_dropped", "_passing_ends", "_passing_stream", "_pending",
        "_ping", "_ping_acked", "_preface_left", "_reset", "_settings_acked",
        "_settings_relayed", "backlog", "control_frames", "data_frames", "dropped",
        "initial_window", "window_debt",
    )  # fmt: skip

    def __init__(
        self,
        headers: HeadersCallback,
        *,
        preface: bool,
        data: DataCallback | None = None,
        ended: StreamCallback | None = None,
        reset: ResetCallback | None = None,
        ping: PingCallback | None = None,
        ping_acked: PingCallback | None = None,
        settings_acked: AckCallback | None = None,
        goaway: GoawayCallback | None = None,
        header_list: HeaderListCallback | None = None,
        dropped_data: DroppedCallback | None = None,
        header_list_limit: int | None = None,
        held_window: ResetCallback | None = None,
        max_block: int = _MAX_HEADER_BLOCK,
        frames_per_pass: int = _FRAMES_PER_PASS,
        block_bytes_per_pass: int = _BLOCK_BYTES_PER_PASS,
    ) -> None:
        self._headers = headers
        self._goaway = goaway
        self._settings_acked = settings_acked
        self._header_list = header_list
        self._header_list_limit = header_list_limit
        self._dropped_data = dropped_data
        self._ping = ping
        self._ping_acked = ping_acked
        self._data = data
        self._ended = ended
        self._reset = reset
        self._max_block = max_block
        self._frames_per_pass = frames_per_pass
        self._block_bytes_per_pass = block_bytes_per_pass
        self._preface_left = len(PREFACE) if preface else 0
        # An incomplete frame header, or a frame we must see whole, and how many bytes
        # that takes: pieces are appended (amortised) and walked only once all are here,
        # so a frame sent a byte at a time costs linear, not quadratic, copying. Input
        # left over when a pass's budget ran out waits here too (awaiting 0).
        self._pending = bytearray()
        self._awaiting = 0
        self._passing = 0  # payload bytes of the current pass-through frame still to come
        self._passing_stream = 0  # the stream of that frame, when it is DATA (else 0)
        self._passing_ends = False  # that frame is DATA with END_STREAM
        self._passing_dropped = False  # that frame is left out (its stream was dropped)
        # A header block spread over CONTINUATION frames: (stream id, flags, fragments).
        self._block: tuple[int, int, list[bytes]] | None = None
        self._block_size = 0
        self._first_frame_done = False
        self._settings_relayed = 0
        # Streams the headers callback dropped (insertion-ordered, bounded): _NOT_HELD,
        # _HELD, or _HELD_ENDED (held, and its sender has ended it).
        self.dropped: dict[int, int] = {}
        # Flow-controlled bytes the other side's peer got from the splice itself (DATA of
        # its own, not the peer's it relays): that peer's connection WINDOW_UPDATEs give
        # them back, and the one this side's sender never sent must not get them.
        self.window_debt = 0
        # The sender's SETTINGS_INITIAL_WINDOW_SIZE: each new stream's window for the other
        # side's DATA (the splice's own answers take from it).
        self.initial_window = 65_535
        self._held_window = held_window
        self.control_frames = 0  # see the module doc; counted for the connection's budget
        self.data_frames = 0  # DATA with a payload, and HEADERS
        self.backlog = False  # input is waiting for the next pass (the budget ran out)

    @property
    def at_frame_boundary(self) -> bool:
        """Whether a frame of the sidecar's own may be inserted now: the bytes returned so
        far end with a whole frame, and the peer's first frame (its SETTINGS, which
        must come first, RFC 9113 3.4) has gone out."""
        return self._first_frame_done and not self._passing

    @property
    def settings_relayed(self) -> int:
        """SETTINGS frames (not ACKs) of the peer relayed so far: each is owed one ACK."""
        return self._settings_relayed

    @property
    def first_frame_done(self) -> bool:
        """Whether the peer's first frame, its SETTINGS, has been walked."""
        return self._first_frame_done

    @property
    def in_frame(self) -> bool:
        """Whether the peer has started a frame that is walked whole, or a header block,
        and not finished it: held here until it does (bounded by max_block)."""
        return (bool(self._pending) and not self.backlog) or self._block is not None

    def drop(self, stream_id: int, *, held: bool = False) -> None:
        """Leave out the stream's further frames (it was answered and ended here). A stream
        `held` stays left out after its sender ends it, until it resets it or is
        released: the splice is still answering it (a health Watch). A stream held
        already stays held (the splice holds it before its DROP is acted on)."""
        if self.dropped.get(stream_id):
            return
        self.dropped[stream_id] = _HELD if held else _NOT_HELD
        if len(self.dropped) > _MAX_DROPPED:
            # The oldest that is not held (the splice holds a few at most).
            oldest = next((stream for stream, kept in self.dropped.items() if not kept), None)
            if oldest is not None:
                del self.dropped[oldest]

    def _sender_ended(self, stream_id: int) -> None:
        # A stream over on both sides stays here (until the oldest are let go): a peer may
        # still send WINDOW_UPDATE, PRIORITY or RST_STREAM on it a while (RFC 9113 5.1),
        # and the other side, which never saw it, would take them as a protocol error.
        if self.dropped.get(stream_id) == _HELD:
            self.dropped[stream_id] = _HELD_ENDED

    def sender_ended(self, stream_id: int) -> bool:
        """Whether the sender has ended (or reset) a held stream."""
        return self.dropped.get(stream_id, _HELD_ENDED) == _HELD_ENDED

    def release(self, stream_id: int) -> None:
        """A held stream (see drop) is over on this side: forgotten at once if its sender
        has ended it, else when it does, as a stream that is not held."""
        if stream_id in self.dropped:
            self.dropped[stream_id] = _NOT_HELD  # (kept, see _sender_ended)

    def _read_initial_window(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - len(payload) % 6, 6):
            if int.from_bytes(payload[offset : offset + 2], "big") == SETTINGS_INITIAL_WINDOW_SIZE:
                self.initial_window = int.from_bytes(payload[offset + 2 : offset + 6], "big")

    def _repaid(self, increment: int) -> bytes | None:
        """The connection's WINDOW_UPDATE to send on for one of `increment` from this
        side's sender, less the window_debt (None: all of it repays the debt)."""
        debt = self.window_debt
        if increment <= debt:
            self.window_debt = debt - increment
            return None
        self.window_debt = 0
        return frame(WINDOW_UPDATE, 0, 0, (increment - debt).to_bytes(4, "big"))

    def detach(self) -> None:
        """Forget every callback, so that the owner and the walker do not keep each other
        alive once the connection is gone (they would wait for the cycle collector)."""
        self._headers = _refuse_headers
        self._goaway = self._settings_acked = self._header_list = None
        self._dropped_data = self._ping = self._ping_acked = None
        self._data = self._ended = self._reset = self._held_window = None

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        """The bytes to send on for `data`, in order (views into `data` where unchanged).

        The hot path of the splice: one pass, locals only, and the common frames
        (DATA, a HEADERS frame holding a whole block, PING, WINDOW_UPDATE)
        handled inline. With `backlog` set after a call, feed(b"") walks on.
        """
        out: list[bytes | memoryview] = []
        if self._pending:
            self._pending += data
            if len(self._pending) < self._awaiting:
                return []
            data, self._pending = bytes(self._pending), bytearray()
        self.backlog = False
        size = len(data)
        position = 0
        if self._preface_left:
            taken = min(self._preface_left, size)
            offset = len(PREFACE) - self._preface_left
            if data[:taken] != PREFACE[offset : offset + taken]:
                raise FrameError("the connection does not start with the HTTP/2 preface")
            self._preface_left -= taken
            position = taken
        on_data = self._data
        run_start = 0  # start of the run of input that goes out unchanged
        view: memoryview | None = None
        if self._passing:
            taken = min(self._passing, size - position)
            self._passing -= taken
            if self._passing_dropped:
                if position:
                    view = memoryview(data)
                    out.append(view[:position])
                run_start = position + taken
            elif self._passing_stream and on_data:
                on_data(self._passing_stream, data, position, position + taken)
            if self._passing_ends and not self._passing:
                self._passing_ends = False
                if self._passing_dropped:
                    self._sender_ended(self._passing_stream)
                elif self._ended:
                    self._ended(self._passing_stream)
            if not self._passing:
                self._passing_dropped = False
            position += taken
        on_headers = self._headers
        dropped = self.dropped
        unpack = _unpack_frame_header
        frames_left = self._frames_per_pass
        block_bytes_left = self._block_bytes_per_pass
        # Counted here, added to the walker's counts once the pass is over (callbacks
        # made during the pass do not read them).
        data_frames = control_frames = 0
        try:
            while size - position >= _HEADER:
                frames_left -= 1
                if frames_left < 0:
                    self.backlog = True  # the rest waits for the next pass
                    break
                length_high, length_low, kind, flags, stream_id = unpack(data, position)
                length = length_high << 16 | length_low
                stream_id &= 0x7FFFFFFF
                end = position + _HEADER + length
                if self._block is not None and kind != CONTINUATION:
                    raise FrameError("a header block was interrupted by another frame")
                if kind == DATA:
                    if not stream_id:
                        raise FrameError("DATA frame on stream 0")  # RFC 9113 6.1
                    if (
                        flags & PADDED
                        and on_data is not None
                        and not (dropped and stream_id in dropped)
                    ):
                        # Taken whole: where the padding starts is in the frame.
                        if length > self._max_block:
                            raise FrameError(f"padded DATA frame is {length} bytes long")
                        if end > size:
                            break
                    if length:  # counted once the frame is taken (not on a walk that waits)
                        data_frames += 1
                    else:
                        control_frames += 1  # an empty DATA frame carries nothing
                    if dropped and stream_id in dropped:
                        if self._dropped_data is not None and length:
                            self._dropped_data(length)
                        if view is None:
                            view = memoryview(data)
                        out.append(view[run_start:position])
                        if end > size:
                            self._passing, self._passing_stream = end - size, stream_id
                            self._passing_ends = bool(flags & END_STREAM)
                            self._passing_dropped = True
                            run_start = position = size
                            break
                        if flags & END_STREAM:
                            self._sender_ended(stream_id)
                        run_start = position = end
                        continue
                    if on_data is not None:
                        if flags & PADDED:
                            if not length or data[position + _HEADER] >= length:
                                raise FrameError("DATA padding longer than the frame")
                            padding = data[position + _HEADER]
                            on_data(stream_id, data, position + _HEADER + 1, end - padding)
                        else:
                            on_data(stream_id, data, position + _HEADER, min(end, size))
                    if end > size:  # stream the rest of the payload as it comes
                        self._passing, self._passing_stream = end - size, stream_id
                        self._passing_ends = bool(flags & END_STREAM)
                        position = size
                        break
                    if flags & END_STREAM and self._ended:
                        self._ended(stream_id)
                    position = end
                    continue
                if kind == HEADERS and flags & _WHOLE_BLOCK_MASK == END_HEADERS:
                    # A whole block in one frame, without padding or priority: the usual case.
                    if length > self._max_block:
                        raise FrameError(f"HEADERS frame is {length} bytes long")
                    if end > size:
                        break
                    data_frames += 1
                    if not stream_id:
                        raise FrameError("HEADERS frame on stream 0")  # RFC 9113 6.2
                    block_bytes_left -= length
                    if block_bytes_left < 0:
                        frames_left = 0  # this block is walked; the next frame waits
                    replacement = on_headers(stream_id, flags, data, position + _HEADER, end)
                    if replacement is not None:
                        if view is None:
                            view = memoryview(data)
                        out.append(view[run_start:position])
                        if replacement is DROP:
                            self.drop(stream_id)
                        else:
                            out.append(
                                header_frames(stream_id, bool(flags & END_STREAM), replacement)  # type: ignore[arg-type]
                            )
                        run_start = end
                    position = end
                    continue
                # What the receiver would take as a connection error is one here, said to be
                # the sender's: relayed, it would end the other connection, blaming the
                # wrong peer.
                if kind == WINDOW_UPDATE:  # RFC 9113 6.9: 4 bytes, an increment of at least 1
                    if length != 4:
                        raise FrameError("WINDOW_UPDATE frame payload is not 4 bytes")
                    if end > size:
                        break  # read whole: its increment is checked
                    if not _unpack_u32(data, position + _HEADER)[0] & 0x7FFFFFFF:
                        raise FrameError("WINDOW_UPDATE with an increment of 0")
                    control_frames += 1
                    if dropped and stream_id in dropped:
                        if view is None:
                            view = memoryview(data)
                        out.append(view[run_start:position])
                        run_start = end
                        if dropped[stream_id] and self._held_window is not None:
                            increment = _unpack_u32(data, position + _HEADER)[0] & 0x7FFFFFFF
                            self._held_window(stream_id, increment)
                    elif not stream_id and self.window_debt:
                        if view is None:
                            view = memoryview(data)
                        out.append(view[run_start:position])
                        run_start = end
                        repaid = self._repaid(_unpack_u32(data, position + _HEADER)[0])
                        if repaid is not None:
                            out.append(repaid)
                    position = end
                    continue
                if kind == PING and self._ping is not None:
                    # Answered on this side (see `ping`), never relayed: the ACKs the peer
                    # sends are for pings of this side's own, and are taken out too.
                    if length != 8:
                        raise FrameError("PING frame payload is not 8 bytes")
                    if stream_id:
                        raise FrameError("PING frame on a stream")  # RFC 9113 6.7
                    if end > size:
                        break
                    control_frames += 1  # an ACK too: this side seldom pings the peer
                    if not flags & ACK:
                        self._ping(data[position + _HEADER : end])
                    elif self._ping_acked is not None:
                        self._ping_acked(data[position + _HEADER : end])
                    if view is None:
                        view = memoryview(data)
                    out.append(view[run_start:position])
                    run_start = end
                    position = end
                    continue
                if kind == PUSH_PROMISE:  # gRPC never pushes; a push would carry a header block
                    raise FrameError("PUSH_PROMISE is not allowed")
                if kind == RST_STREAM:
                    if length != 4:
                        raise FrameError("RST_STREAM frame payload is not 4 bytes")
                    if end > size:
                        break
                    control_frames += 1
                    if not stream_id:
                        raise FrameError("RST_STREAM frame on stream 0")  # RFC 9113 6.4
                    if dropped and stream_id in dropped:
                        # The stream is over on both sides now (kept, see _sender_ended);
                        # one still answered on this side (held) is reported, for its
                        # answers to stop.
                        if dropped[stream_id] and self._reset:
                            self._reset(stream_id, _unpack_u32(data, position + _HEADER)[0])
                        dropped[stream_id] = _NOT_HELD
                        if view is None:
                            view = memoryview(data)
                        out.append(view[run_start:position])
                        run_start = position = end
                        continue
                    if self._reset:
                        self._reset(stream_id, _unpack_u32(data, position + _HEADER)[0])
                    position = end
                    continue
                if kind == PRIORITY and length != 5:  # RFC 9113 6.3
                    raise FrameError("PRIORITY frame payload is not 5 bytes")
                if kind in (PING, PRIORITY) or (kind == GOAWAY and not self._goaway):
                    if dropped and kind != GOAWAY and length <= 8:
                        if end > size:
                            break  # read whole: it may be left out
                        control_frames += 1
                        if stream_id in dropped:
                            if view is None:
                                view = memoryview(data)
                            out.append(view[run_start:position])
                            run_start = position = end
                            continue
                    else:
                        control_frames += 1
                    if end > size:  # stream the rest of the payload as it comes
                        self._passing, self._passing_stream = end - size, 0
                        position = size
                        break
                    position = end
                    continue
                if length > self._max_block:
                    raise FrameError(f"frame of type {kind} is {length} bytes long")
                if end > size:
                    break  # wait for the whole frame
                if kind in (HEADERS, CONTINUATION):
                    block_bytes_left -= length
                    if block_bytes_left < 0:
                        frames_left = 0
                replacement = self._rewrite(kind, data[position:end])
                if replacement is not None:
                    if view is None:
                        view = memoryview(data)
                    out.append(view[run_start:position])
                    out.append(replacement)
                    run_start = end
                position = end
        finally:
            self.data_frames += data_frames
            self.control_frames += control_frames
        if position < size:
            self._pending = bytearray(data[position:])
            if self.backlog:
                self._awaiting = 0
            else:
                self._awaiting = (
                    _HEADER
                    if size - position < _HEADER
                    else _HEADER + int.from_bytes(data[position : position + 3], "big")
                )
        if not out and not run_start:  # nothing left out: the input, as far as it was walked
            if position == size:
                return [data] if size else []
            return [memoryview(data)[:position]] if position else []  # a view: no copy
        if view is None:
            view = memoryview(data)
        out.append(view[run_start:position])
        return [chunk for chunk in out if len(chunk)]

    def _rewrite(self, kind: int, whole: bytes) -> bytes | None:
        """The bytes to send instead of this frame, or None to send it unchanged."""
        flags = whole[4]
        stream_id = int.from_bytes(whole[5:9], "big") & 0x7FFFFFFF
        payload = whole[_HEADER:]  # (feed has refused any frame interrupting a block)
        if kind == GOAWAY:  # with a `goaway` callback, read whole (debug data is small)
            if len(payload) < 8:
                raise FrameError("GOAWAY frame payload is shorter than 8 bytes")
            assert self._goaway is not None
            self._goaway(int.from_bytes(payload[:4], "big") & 0x7FFFFFFF)
            return None
        if kind == SETTINGS:
            if stream_id:  # RFC 9113 6.5: connection errors, the sender's
                raise FrameError("SETTINGS frame on a stream")
            if flags & ACK and payload:
                raise FrameError("SETTINGS ACK with a payload")
            if flags & ACK:
                self.control_frames += 1
                if self._settings_acked is not None and self._settings_acked() is False:
                    return b""  # an ACK of nothing the other side sent: left out
                return None
            self._settings_relayed += 1
            if self._first_frame_done:
                self.control_frames += 1  # the first is part of the connection preface
            self._first_frame_done = True  # once it is out; the peer's first frame
            self._read_initial_window(payload)
            payload = _rewritten_settings(payload, self._header_list_limit, self._header_list)
            return frame(SETTINGS, flags, stream_id, payload)
        if kind == HEADERS:
            if not stream_id:
                raise FrameError("HEADERS frame on stream 0")  # RFC 9113 6.2
            self._block = (stream_id, flags, [header_fragment(flags, payload)])
            self._block_size = len(payload)
        elif kind == CONTINUATION:
            if self._block is None or self._block[0] != stream_id:
                raise FrameError("CONTINUATION without the HEADERS it continues")
            self._block[2].append(payload)
            self._block_size += _HEADER + len(payload)  # empty CONTINUATIONs count too
            if self._block_size > self._max_block or len(self._block[2]) > _MAX_FRAGMENTS:
                raise FrameError("header block too large")
            flags = flags | self._block[1]
        else:
            self.control_frames += 1
            return None  # a frame type this sidecar does not know: passed as it is
        if not flags & END_HEADERS:
            return b""  # the block continues; sent whole once complete
        stream_id, first_flags, fragments = self._block
        self._block = None
        self.data_frames += 1
        received = fragments[0] if len(fragments) == 1 else b"".join(fragments)
        block = self._headers(stream_id, first_flags, received, 0, len(received))
        if block is DROP:
            self.drop(stream_id)
            return b""
        if block is None:
            if kind == HEADERS and not first_flags & (PADDED | PRIORITY_FLAG):
                return None  # unchanged, in one frame: send the frame as it came
            block = received
        return header_frames(stream_id, bool(first_flags & END_STREAM), block)  # type: ignore[arg-type]


def _refuse_headers(stream_id: int, flags: int, buffer: bytes, start: int, end: int) -> None:
    raise FrameError("the connection is closed")
