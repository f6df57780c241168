"""What must cross a FrameWalker, frame by frame, as hyperframe reads the frames (the oracle).

The model is written from RFC 9113 and hyperframe's parse, not from frames.py:
- a frame the walker does not read (WINDOW_UPDATE, PRIORITY, extension types, and
  PING / GOAWAY when no callback takes them) crosses byte-identical, whatever its
  content: the receiving peer judges it;
- a frame whose content the walker acts on (HEADERS, CONTINUATION, SETTINGS,
  RST_STREAM, DATA, PING / GOAWAY with a callback) must be reported exactly as
  hyperframe parses it; where hyperframe refuses it, the walker may refuse it too or
  go on, and the comparison stops there ("unjudged");
- a header block interrupted by another frame, a CONTINUATION that continues
  nothing, PUSH_PROMISE (gRPC never pushes), and a connection that does not open
  with the preface must be refused (RFC 9113 6.10, 8.4, 3.4);
- a stream whose request block the headers callback answered with DROP (the
  splice answered the call itself) is left out from then on: its DATA (whose
  flow-controlled length is reported, for the window to be given back), its
  RST_STREAM, and its PRIORITY / WINDOW_UPDATE / PING; its END_STREAM or
  RST_STREAM ends it. What frames.py documents, restated.
Where hyperframe and the RFC differ on HEADERS padding, the RFC is followed (see
`_fragment`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from sidecar.h2.frames import _MAX_DROPPED, DROP, _Drop

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
MAX_SETTINGS_ENTRIES = 32  # what frames.py allows in one SETTINGS frame (nghttp2's default)
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
HEADER_TABLE_SIZE, MAX_HEADER_LIST_SIZE = 0x1, 0x6
# grpc core's extension (raw -bin values, NUL and all): never negotiated through the sidecar,
# whose request checks need values RFC 9113 8.2.1 can judge (see frames.py).
GRPC_TRUE_BINARY = 0xFE03
MIN_MAX_FRAME_SIZE = 16384  # RFC 9113 4.2: every peer accepts frames this large
# What the walker may hold of one frame or header block (frames.py documents the
# bound); the fuzz streams stay far below it, so a refusal for size is only allowed.
HELD_LIMIT = 256 * 1024

Event = tuple[object, ...]


@dataclass(frozen=True)
class Hooks:
    """Which FrameWalker callbacks are given, and what the headers callback returns."""

    data: bool = True
    ended: bool = True
    reset: bool = True
    ping: bool = True
    acked: bool = True
    goaway: bool = True
    header_list: bool = True
    dropped_data: bool = True
    header_list_limit: int | None = None
    rewrite: str = "keep"  # keep | small | large | mixed | drop (see `replacement`)


def replacement(mode: str, stream_id: int, block: bytes) -> bytes | _Drop | None:
    """The headers callback's answer for a block: None (unchanged), another block, or DROP."""
    if mode == "keep" or (mode in ("mixed", "drop") and len(block) % 2):
        return None
    if mode == "drop":
        return DROP
    if mode == "large":  # more than one frame holds: HEADERS + CONTINUATION on the way out
        return block + bytes(MIN_MAX_FRAME_SIZE + 600)
    return block[::-1] + stream_id.to_bytes(4, "big")


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def split(stream: bytes, preface: bool) -> Iterator[tuple[bytes, bool]]:
    """The input as the preface and whole frames, each with whether it is complete."""
    position = 0
    if preface:
        yield stream[: len(PREFACE)], len(stream) >= len(PREFACE)
        position = len(PREFACE)
    while position < len(stream):
        if len(stream) - position < 9:
            yield stream[position:], False
            return
        end = position + 9 + int.from_bytes(stream[position : position + 3], "big")
        yield stream[position:end], end <= len(stream)
        position = end


@dataclass(frozen=True)
class Exact:
    data: bytes


@dataclass(frozen=True)
class Block:
    """A header block sent on as HEADERS (+ CONTINUATION) frames."""

    stream_id: int
    end_stream: bool
    block: bytes


@dataclass(frozen=True)
class Settings:
    """A SETTINGS frame with these entries, in this order."""

    flags: int
    stream_id: int
    entries: tuple[tuple[int, int], ...]


Expected = Exact | Block | Settings


@dataclass
class Verdict:
    """agree: must not refuse, and must send `output` and report `events`;
    either: may refuse, else as agree; refuse: must refuse;
    unjudged: the oracle refuses the frame, so the walker may do either (comparison stops)."""

    kind: Literal["agree", "either", "refuse", "unjudged"]
    output: list[Expected] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    why: str = ""


def _parse(raw: bytes) -> Frame:
    """hyperframe's reading of one whole frame (raises HyperframeError)."""
    frame, length = Frame.parse_frame_header(memoryview(raw[:9]))
    frame.parse_body(memoryview(raw[9 : 9 + length]))
    return frame


def _fragment(flags: int, payload: bytes) -> bytes | None:
    """A HEADERS frame's block fragment by RFC 9113 6.2, or None when its padding
    exceeds what the frame holds. (hyperframe refuses padding that leaves an empty
    fragment, which the RFC allows, and cuts the fragment to nothing silently when
    padding overlaps the priority fields, which the RFC makes a PROTOCOL_ERROR.)"""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload:
            return None
        start, end = 1, end - payload[0]
    if flags & PRIORITY_FLAG:
        start += 5
    return payload[start:end] if start <= end else None


def settings_entries(payload: bytes) -> tuple[tuple[int, int], ...]:
    return tuple(
        (int.from_bytes(payload[i : i + 2], "big"), int.from_bytes(payload[i + 2 : i + 6], "big"))
        for i in range(0, len(payload) - len(payload) % 6, 6)
    )


def _malformed_control(
    raw: bytes, complete: bool, kind: int, stream_id: int, length: int
) -> Verdict | None:
    """RFC 9113 6.3, 6.4, 6.9: what the receiver would take as a connection error is refused
    (a WINDOW_UPDATE is held whole for its increment to be read); None for the rest."""
    if kind == WINDOW_UPDATE:
        if length != 4:
            return Verdict("refuse", why="WINDOW_UPDATE not 4 bytes")
        if not complete:
            return Verdict("agree", [], why="held whole: its increment is checked")
        if not int.from_bytes(raw[9:13], "big") & 0x7FFFFFFF:
            return Verdict("refuse", why="WINDOW_UPDATE of 0")
    if kind == PRIORITY and length != 5:
        return Verdict("refuse", why="PRIORITY not 5 bytes")
    if kind == RST_STREAM and length == 4 and complete and stream_id == 0:
        return Verdict("refuse", why="RST_STREAM on stream 0")
    return None


class FrameOracle:
    """Judges a stream fed to a FrameWalker one piece from `split` at a time."""

    def __init__(self, hooks: Hooks, *, preface: bool) -> None:
        self.hooks = hooks
        self.preface = preface
        self.settings_seen = False  # the peer's first SETTINGS has gone out
        # An open header block: (stream id, flags of its HEADERS, fragments, bytes held).
        self._block: tuple[int, int, list[bytes], int] | None = None
        # Streams the headers callback dropped, oldest first. Ended or reset, they stay left
        # out (late WINDOW_UPDATE, PRIORITY, RST_STREAM on them would reach a peer that
        # never saw the stream) until the walker's bound lets the oldest go.
        self.dropped: dict[int, None] = {}

    def judge(self, raw: bytes, complete: bool) -> Verdict:
        if self.preface:
            self.preface = False
            if PREFACE.startswith(raw):
                return Verdict("agree", [Exact(raw)])
            return Verdict("refuse", why="not the HTTP/2 preface")
        if len(raw) < 9:
            return Verdict("agree", [], why="an incomplete frame header: held")
        kind, flags = raw[3], raw[4]
        stream_id = int.from_bytes(raw[5:9], "big") & 0x7FFFFFFF
        length = int.from_bytes(raw[:3], "big")
        if self._block is not None and kind != CONTINUATION:
            return Verdict("refuse", why="a header block interrupted by another frame")
        if kind == PUSH_PROMISE:
            return Verdict("refuse", why="PUSH_PROMISE")
        malformed = _malformed_control(raw, complete, kind, stream_id, length)
        if malformed is not None:
            return malformed
        left_out = self._left_out(raw, complete, kind, flags, stream_id, length)
        if left_out is not None:
            return left_out
        if self._streamed(kind, flags):
            return self._judge_streamed(raw, complete, kind, flags, stream_id)
        if not complete or length > HELD_LIMIT:
            # Held until whole; the walker may refuse on what the frame header says
            # (a length no such frame has, a frame bigger than it holds).
            return Verdict("either", [], why="an incomplete frame held whole")
        try:
            frame = _parse(raw)
        except HyperframeError as error:
            if kind != HEADERS or _fragment(flags, raw[9:]) is None or stream_id == 0:
                return self._unknown_or_unjudged(raw, kind, f"hyperframe: {error}")
            frame = HeadersFrame(stream_id)  # only hyperframe's padding rule differs
        return self._judge_whole(raw, kind, flags, stream_id, frame)

    def _left_out(
        self, raw: bytes, complete: bool, kind: int, flags: int, stream_id: int, length: int
    ) -> Verdict | None:
        """The verdict on a frame of a dropped stream, or on a small frame that may be one
        (held whole while any stream is dropped); None for the other frames."""
        if not self.dropped:
            return None
        if kind == DATA and stream_id in self.dropped:
            events: list[Event] = (
                [("dropped_data", length)] if self.hooks.dropped_data and length else []
            )
            return Verdict("agree", [], events, why="DATA of a dropped stream")
        small = kind in (WINDOW_UPDATE, PRIORITY) or (kind == PING and not self.hooks.ping)
        if (
            (small or kind == RST_STREAM)
            and length <= 8
            and not (kind == RST_STREAM and length != 4)
        ):
            if not complete:
                return Verdict("agree", [], why="held whole: it may be left out")
            if stream_id in self.dropped:
                return Verdict("agree", [], why="a frame of a dropped stream")
            if small:
                return Verdict("agree", [Exact(raw)], why="crosses unread")
        return None

    def _streamed(self, kind: int, flags: int) -> bool:
        """Frames the walker passes on as their bytes come, without holding them."""
        hooks = self.hooks
        return (
            (kind == DATA and not (hooks.data and flags & PADDED))
            or kind in (WINDOW_UPDATE, PRIORITY)
            or (kind == PING and not hooks.ping)
            or (kind == GOAWAY and not hooks.goaway)
        )

    def _judge_streamed(
        self, raw: bytes, complete: bool, kind: int, flags: int, stream_id: int
    ) -> Verdict:
        if kind != DATA:
            return Verdict("agree", [Exact(raw)], why="crosses unread")
        if stream_id == 0:
            return Verdict("unjudged", why="DATA on stream 0")
        events: list[Event] = []
        if self.hooks.data:  # unpadded here: the payload as it has come
            events.append(("data", stream_id, raw[9:]))
        if complete:
            try:
                _parse(raw)
            except HyperframeError as error:
                return Verdict("unjudged", why=f"hyperframe: {error}")
            if flags & END_STREAM and self.hooks.ended:
                events.append(("ended", stream_id))
        return Verdict("agree", [Exact(raw)], events)

    def _unknown_or_unjudged(self, raw: bytes, kind: int, why: str) -> Verdict:
        if kind > CONTINUATION:  # hyperframe's ALTSVC (0xA) is, to gRPC, an unknown type
            return Verdict("agree", [Exact(raw)], why="an extension frame crosses unread")
        return Verdict("unjudged", why=why)

    def _judge_whole(
        self, raw: bytes, kind: int, flags: int, stream_id: int, frame: Frame
    ) -> Verdict:
        hooks = self.hooks
        if isinstance(frame, DataFrame):  # padded, with a data callback
            events: list[Event] = [("data", stream_id, frame.data)]
            if flags & END_STREAM and hooks.ended:
                events.append(("ended", stream_id))
            return Verdict("agree", [Exact(raw)], events)
        if isinstance(frame, RstStreamFrame):
            events = [("reset", stream_id, frame.error_code)] if hooks.reset else []
            return Verdict("agree", [Exact(raw)], events)
        if isinstance(frame, SettingsFrame):
            if flags & ACK:
                return Verdict("agree", [Exact(raw)], [("acked",)] if hooks.acked else [])
            if len(raw) - 9 > 6 * MAX_SETTINGS_ENTRIES:
                return Verdict("refuse", why="a SETTINGS frame of too many entries")
            self.settings_seen = True
            return self._settings(raw, flags, stream_id)
        if isinstance(frame, PingFrame):  # taken by the ping callback, never relayed
            return Verdict("agree", [], [] if flags & ACK else [("ping", frame.opaque_data)])
        if isinstance(frame, GoAwayFrame):
            return Verdict("agree", [Exact(raw)], [("goaway", frame.last_stream_id & 0x7FFFFFFF)])
        if kind == HEADERS:
            fragment = _fragment(flags, raw[9:])
            if fragment is None:
                return Verdict("either", why="HEADERS padding overlaps the priority fields")
            self._block = (stream_id, flags, [fragment], len(raw) - 9)
            return self._block_step(raw, flags, whole_frame=not flags & (PADDED | PRIORITY_FLAG))
        if kind == CONTINUATION:
            if self._block is None or self._block[0] != stream_id:
                return Verdict("refuse", why="CONTINUATION without its HEADERS")
            block_stream, first_flags, fragments, held = self._block
            fragments.append(raw[9:])
            self._block = (block_stream, first_flags, fragments, held + len(raw))
            if held + len(raw) > HELD_LIMIT or len(fragments) > 1024:
                return Verdict("either", why="a header block larger than the walker holds")
            return self._block_step(raw, flags, whole_frame=False)
        return Verdict("agree", [Exact(raw)], why="an extension frame crosses unread")

    def _settings(self, raw: bytes, flags: int, stream_id: int) -> Verdict:
        """HEADER_TABLE_SIZE 0 in every SETTINGS (see headerblock.py), grpc core's true-binary
        setting left out; with a header-list limit, MAX_HEADER_LIST_SIZE lowered to it; the
        peer's own limits reported."""
        entries = settings_entries(raw[9:])
        limit = self.hooks.header_list_limit
        lists = [value for ident, value in entries if ident == MAX_HEADER_LIST_SIZE]
        kept = [
            (ident, value)
            for ident, value in entries
            if ident not in (HEADER_TABLE_SIZE, GRPC_TRUE_BINARY)
            and (limit is None or ident != MAX_HEADER_LIST_SIZE)
        ]
        kept.append((HEADER_TABLE_SIZE, 0))
        if limit is not None:
            kept.append((MAX_HEADER_LIST_SIZE, min([limit, *lists])))
        events: list[Event] = [("header_list", v) for v in lists] if self.hooks.header_list else []
        return Verdict("agree", [Settings(flags, stream_id, tuple(kept))], events)

    def _block_step(self, raw: bytes, flags: int, *, whole_frame: bool) -> Verdict:
        assert self._block is not None
        if not flags & END_HEADERS:
            return Verdict("agree", [], why="the block continues")
        stream_id, first_flags, fragments, _ = self._block
        self._block = None
        block = b"".join(fragments)
        events: list[Event] = [("headers", stream_id, first_flags, block)]
        answer = replacement(self.hooks.rewrite, stream_id, block)
        if answer is DROP:
            self.dropped[stream_id] = None
            if len(self.dropped) > _MAX_DROPPED:
                del self.dropped[next(iter(self.dropped))]
            return Verdict("agree", [], events, why="a dropped stream's block is left out")
        assert not isinstance(answer, _Drop)
        if answer is None and whole_frame:
            return Verdict("agree", [Exact(raw)], events)
        sent = block if answer is None else answer
        return Verdict("agree", [Block(stream_id, bool(first_flags & END_STREAM), sent)], events)


def frames_of(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each frame in `data`, which must hold whole frames."""
    frames, position = [], 0
    while position < len(data):
        assert len(data) - position >= 9, "output ends inside a frame header"
        length = int.from_bytes(data[position : position + 3], "big")
        end = position + 9 + length
        assert end <= len(data), "output ends inside a frame"
        stream_id = int.from_bytes(data[position + 5 : position + 9], "big") & 0x7FFFFFFF
        frames.append((data[position + 3], data[position + 4], stream_id, data[position + 9 : end]))
        position = end
    return frames


def check_output(sent: bytes, expected: list[Expected]) -> None:
    """Assert that `sent` is what `expected` describes."""
    if not expected:
        assert sent == b""
        return
    (what,) = expected
    if isinstance(what, Exact):
        assert sent == what.data
        return
    frames = frames_of(sent)
    for kind, flags, stream_id, payload in frames:  # every frame sent parses
        _parse(raw_frame(kind, flags, stream_id, payload))
    if isinstance(what, Settings):
        ((kind, flags, stream_id, payload),) = frames
        assert (kind, flags, stream_id) == (SETTINGS, what.flags, what.stream_id)
        assert settings_entries(payload) == what.entries
        assert len(payload) % 6 == 0
        return
    kinds = [HEADERS] + [CONTINUATION] * (len(frames) - 1)
    assert [kind for kind, *_ in frames] == kinds
    assert all(stream_id == what.stream_id for _, _, stream_id, _ in frames)
    assert all(len(payload) <= MIN_MAX_FRAME_SIZE for *_, payload in frames)
    first_flags = frames[0][1]
    assert first_flags & END_STREAM == (END_STREAM if what.end_stream else 0)
    assert not first_flags & (PADDED | PRIORITY_FLAG)
    assert [flags & END_HEADERS for _, flags, _, _ in frames] == [0] * (len(frames) - 1) + [
        END_HEADERS
    ]
    assert b"".join(payload for *_, payload in frames) == what.block
