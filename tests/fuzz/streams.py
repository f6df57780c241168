"""Hypothesis strategies for HTTP/2 byte streams: valid frames built with hyperframe, then
mutated, or bytes at random; and the chunk boundaries they arrive in."""

from __future__ import annotations

from dataclasses import dataclass

from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)
from hypothesis import strategies as st

from tests.fuzz.frame_oracle import ACK, PREFACE, SETTINGS, Hooks, raw_frame

# Mostly the few streams of one connection, sometimes any id a peer may use.
stream_ids = st.one_of(st.sampled_from([1, 3, 5]), st.integers(1, 2**31 - 1))
small_payloads = st.binary(max_size=48)
payloads = st.one_of(
    small_payloads,
    small_payloads,
    # Larger than one read and one output frame: streamed in pieces, or split on the way out.
    st.integers(16_000, 20_000).map(lambda n: bytes(range(256)) * (n // 256)),
)


def _flags(*names: tuple[str, bool]) -> list[str]:
    return [name for name, present in names if present]


@st.composite
def data_frames(draw: st.DrawFn) -> bytes:
    padded = draw(st.booleans())
    frame = DataFrame(
        draw(stream_ids),
        data=draw(payloads),
        flags=_flags(("END_STREAM", draw(st.booleans())), ("PADDED", padded)),
        pad_length=draw(st.integers(0, 255)) if padded else 0,
    )
    return bytes(frame.serialize())


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    """One header block: a HEADERS frame (padded, with priority, or plain) and the
    CONTINUATION frames that finish it. The block's bytes are opaque to the walker."""
    stream_id = draw(stream_ids)
    block = draw(st.one_of(st.binary(max_size=200), st.binary(max_size=4000)))
    cuts = sorted(draw(st.lists(st.integers(0, len(block)), max_size=3)))
    fragments = [block[a:b] for a, b in zip([0, *cuts], [*cuts, len(block)], strict=True)]
    padded, priority = draw(st.booleans()), draw(st.booleans())
    first = HeadersFrame(
        stream_id,
        data=fragments[0],
        flags=_flags(
            ("END_STREAM", draw(st.booleans())),
            ("END_HEADERS", len(fragments) == 1),
            ("PADDED", padded),
            ("PRIORITY", priority),
        ),
        pad_length=draw(st.integers(0, 255)) if padded else 0,
        depends_on=draw(st.integers(0, 2**31 - 1)),
        stream_weight=draw(st.integers(0, 255)),
        exclusive=draw(st.booleans()),
    )
    frames = [first] + [
        ContinuationFrame(
            stream_id, data=fragment, flags=_flags(("END_HEADERS", i == len(fragments) - 1))
        )
        for i, fragment in enumerate(fragments[1:], start=1)
    ]
    return b"".join(bytes(frame.serialize()) for frame in frames)


@st.composite
def settings_frames(draw: st.DrawFn) -> bytes:
    """SETTINGS as raw entries: repeated identifiers (HEADER_TABLE_SIZE among them) and
    unknown ones are allowed (RFC 9113 6.5.2), which hyperframe's dict cannot express."""
    if draw(st.integers(0, 3)) == 0:
        return raw_frame(SETTINGS, ACK, 0, b"")
    entries = draw(
        st.lists(
            st.tuples(
                st.one_of(
                    st.sampled_from([1, 1, 2, 3, 4, 5, 6, 6, 8, 0xFE03]), st.integers(0, 0xFFFF)
                ),
                st.integers(0, 2**32 - 1),
            ),
            max_size=8,
        )
    )
    payload = b"".join(
        ident.to_bytes(2, "big") + value.to_bytes(4, "big") for ident, value in entries
    )
    return raw_frame(SETTINGS, 0, 0, payload)


@st.composite
def control_frames(draw: st.DrawFn) -> bytes:
    which = draw(st.integers(0, 5))
    frame: Frame
    if which == 0:
        frame = PingFrame(
            0,
            opaque_data=draw(st.binary(min_size=8, max_size=8)),
            flags=_flags(("ACK", draw(st.booleans()))),
        )
    elif which == 1:
        frame = GoAwayFrame(
            0,
            last_stream_id=draw(st.integers(0, 2**31 - 1)),
            error_code=draw(st.integers(0, 2**32 - 1)),
            additional_data=draw(small_payloads),
        )
    elif which == 2:
        frame = RstStreamFrame(draw(stream_ids), error_code=draw(st.integers(0, 2**32 - 1)))
    elif which == 3:
        frame = WindowUpdateFrame(
            draw(st.one_of(st.just(0), stream_ids)),
            window_increment=draw(st.integers(1, 2**31 - 1)),
        )
    elif which == 4:
        frame = PriorityFrame(
            draw(stream_ids),
            depends_on=draw(st.integers(0, 2**31 - 1)),
            stream_weight=draw(st.integers(0, 255)),
            exclusive=draw(st.booleans()),
        )
    else:  # an extension type (RFC 9113 5.5), ALTSVC's among them
        return raw_frame(
            draw(st.integers(0x0A, 0xFF)),
            draw(st.integers(0, 255)),
            draw(st.integers(0, 2**31 - 1)),
            draw(small_payloads),
        )
    return bytes(frame.serialize())


@st.composite
def push_promises(draw: st.DrawFn) -> bytes:
    frame = PushPromiseFrame(
        draw(stream_ids),
        promised_stream_id=draw(st.integers(2, 2**31 - 1)),
        data=draw(small_payloads),
        flags=["END_HEADERS"],
    )
    return bytes(frame.serialize())


frames = st.one_of(
    data_frames(),
    header_blocks(),
    header_blocks(),
    settings_frames(),
    control_frames(),
    control_frames(),
)


@st.composite
def mutated(draw: st.DrawFn, stream: bytes) -> bytes:
    """The stream with a few bytes flipped, inserted, removed, or cut short."""
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        operation = draw(st.sampled_from(["flip", "flip", "insert", "delete", "truncate"]))
        if operation == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=9))
        elif operation == "delete":
            del data[at : at + draw(st.integers(1, 9))]
        elif operation == "truncate":
            del data[at:]
    return bytes(data)


@dataclass(frozen=True)
class FrameCase:
    hooks: Hooks
    preface: bool
    stream: bytes


hooks = st.builds(
    Hooks,
    data=st.booleans(),
    ended=st.booleans(),
    reset=st.booleans(),
    ping=st.booleans(),
    acked=st.booleans(),
    goaway=st.booleans(),
    header_list=st.booleans(),
    dropped_data=st.booleans(),
    header_list_limit=st.one_of(st.none(), st.sampled_from([0, 8192, 16384, 2**32 - 1])),
    rewrite=st.sampled_from(["keep", "small", "large", "mixed", "drop", "drop"]),
)


@st.composite
def frame_cases(draw: st.DrawFn, hook_choices: st.SearchStrategy[Hooks] = hooks) -> FrameCase:
    """A walker's configuration and an input for it: valid, mutated, or random."""
    preface = draw(st.booleans())
    origin = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "random"]))
    if origin == "random":
        stream = draw(st.binary(max_size=600))
        if preface and draw(st.booleans()):
            stream = PREFACE + stream
    else:
        chosen = draw(
            st.lists(
                st.one_of(frames, push_promises()) if draw(st.integers(0, 9)) == 0 else frames,
                max_size=16,
            )
        )
        stream = (PREFACE if preface else b"") + b"".join(chosen)
        if origin == "mutated":
            stream = draw(mutated(stream))
    return FrameCase(draw(hook_choices), preface, stream)


@st.composite
def chunkings(draw: st.DrawFn, size: int) -> list[tuple[int, int]]:
    """Boundaries at which `size` bytes arrive: mostly a few reads, sometimes many tiny ones."""
    if draw(st.integers(0, 4)) == 0:
        piece = draw(st.integers(1, 7))
        cuts = list(range(piece, size, piece))
    else:
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, size - 1)), max_size=12))))
        cuts = [cut for cut in cuts if cut < size]
    return list(zip([0, *cuts], [*cuts, size], strict=True))
