"""A refused connection's input, in whole frames, a loop turn's worth at a time, within budgets.

h2 processes every byte it is given, 20-30 us a frame, and holds a frame until it
is complete and a header block until its last CONTINUATION, however large. So a
`Refusal` does not give it what the caller sent as it comes: an `Intake` holds
the input, walks its frame headers (9 bytes each, RFC 9113 4.1), and hands over
the preface and at most a turn's budget of whole frames at a time. On the way it
counts the connection's budgets (config/limits.py: denied_bytes, denied_frames,
max_header_block) and checks each frame's length on its header, before its
payload is held; what costs h2 far more than its size says is refused too (a
SETTINGS frame of many entries, a header block of many table size updates): a
caller past one raises `Overrun`, with the GOAWAY error code it earns. Sans-IO:
the refusal owns the socket, the turns and the clock.
"""

from __future__ import annotations

import h2.errors

from sidecar.config.limits import Limits
from sidecar.h2.frames import (
    CONTINUATION,
    END_HEADERS,
    HEADERS,
    MAX_SETTINGS_ENTRIES,
    PREFACE,
    SETTINGS,
    FrameError,
    header_fragment,
)
from sidecar.h2.headerblock import HeaderBlockError, check_size_updates

# Frames handed to h2 in one loop turn: well under a millisecond of its time (20-30 us
# each), so that every other caller's work waits that little for this connection's turn.
FRAMES_PER_TURN = 32
# The largest frame a caller may send: SETTINGS_MAX_FRAME_SIZE as the refusal advertises
# it (the protocol's minimum).
MAX_FRAME = 16_384
_FRAME_HEADER = 9
# A block's opening bytes that check_size_updates may read: two table size updates of at
# most 6 bytes each (a longer integer is refused as bad), then the first byte after them.
_OPENING = 32


class Overrun(Exception):
    """The caller went past a budget: its connection ends with GOAWAY(error_code)."""

    def __init__(self, error_code: h2.errors.ErrorCodes, reason: str) -> None:
        super().__init__(reason)
        self.error_code = error_code
        self.reason = reason


class Intake:
    """The input of one connection not yet handed to h2 (whole frames only are: h2 then
    holds no partial frame), and what the connection has spent of its budgets."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._input = bytearray()
        self._preface_left = len(PREFACE)
        self._block_size = 0  # of the header block in progress (HEADERS + CONTINUATIONs)
        # Its opening bytes: where table size updates may stand (h2's decoder refuses one
        # after a field), all check_size_updates reads. h2 holds the block itself.
        self._opening = b""
        self.frames = 0
        self.bytes = 0

    def add(self, data: bytes) -> None:
        """Hold what the caller sent (at most denied_bytes over the connection's life)."""
        self.bytes += len(data)
        if self.bytes > self._limits.denied_bytes:
            raise Overrun(
                h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                f"over {self._limits.denied_bytes} bytes received",
            )
        self._input += data

    def take(self) -> bytes:
        """What h2 gets this turn: the preface (as far as it came) and up to a turn's
        budget of whole frames, in order; b"" for nothing whole yet."""
        data, size = self._input, len(self._input)
        position = 0
        if self._preface_left:
            position = min(self._preface_left, size)  # h2 checks what it says
            self._preface_left -= position
        if not self._preface_left:
            position = self._walk(position)
        taken = bytes(data[:position])
        del data[:position]  # amortised O(1): a bytearray keeps an offset
        return taken

    def _walk(self, position: int) -> int:
        """The end of the whole frames from position h2 may have this turn."""
        data, size = self._input, len(self._input)
        limits = self._limits
        allowed = min(FRAMES_PER_TURN, limits.denied_frames - self.frames)
        taken = 0
        while size - position >= _FRAME_HEADER:
            length = int.from_bytes(data[position : position + 3], "big")
            if length > MAX_FRAME:  # refused on its header: its payload is never held
                raise Overrun(h2.errors.ErrorCodes.FRAME_SIZE_ERROR, f"a {length}-byte frame")
            if size - position < _FRAME_HEADER + length:
                break
            if taken == allowed:
                if self.frames + taken >= limits.denied_frames:
                    raise Overrun(
                        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                        f"over {limits.denied_frames} frames",
                    )
                break
            kind, flags = data[position + 3], data[position + 4]
            if kind == SETTINGS and length > 6 * MAX_SETTINGS_ENTRIES:
                raise Overrun(
                    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                    f"a SETTINGS frame of over {MAX_SETTINGS_ENTRIES} entries",
                )
            if kind in (HEADERS, CONTINUATION):
                # h2 holds a block's frames until its last; each CONTINUATION counts its
                # frame header too (empty ones cost h2 as much).
                if kind == HEADERS:
                    self._block_size = length
                else:
                    self._block_size += _FRAME_HEADER + length
                if self._block_size > limits.max_header_block:
                    raise Overrun(
                        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                        f"a header block over {limits.max_header_block} bytes",
                    )
                start = position + _FRAME_HEADER
                if kind == HEADERS:
                    try:
                        fragment = header_fragment(flags, bytes(data[start : start + length]))
                    except FrameError as error:
                        raise Overrun(h2.errors.ErrorCodes.PROTOCOL_ERROR, str(error)) from None
                    self._opening = fragment[:_OPENING]
                elif len(self._opening) < _OPENING:
                    missing = _OPENING - len(self._opening)
                    self._opening += data[start : start + min(length, missing)]
                if flags & END_HEADERS:
                    self._block_size = 0
                    opening, self._opening = self._opening, b""
                    try:
                        check_size_updates(opening)
                    except HeaderBlockError as error:
                        raise Overrun(h2.errors.ErrorCodes.COMPRESSION_ERROR, str(error)) from None
            position += _FRAME_HEADER + length
            taken += 1
        self.frames += taken
        return position

    @property
    def waiting(self) -> bool:
        """Whether another turn has something whole to hand over (the preface, a frame)."""
        data, size = self._input, len(self._input)
        if self._preface_left:
            return size >= self._preface_left
        if size < _FRAME_HEADER:
            return False
        return size >= _FRAME_HEADER + int.from_bytes(data[:3], "big")

    def clear(self) -> None:
        self._input.clear()
