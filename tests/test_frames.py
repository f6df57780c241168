"""HTTP/2 framing on the spliced path: what passes unchanged, what is rewritten, what is refused."""

from __future__ import annotations

import pytest

from sidecar.h2.frames import (
    CONTINUATION,
    DATA,
    DROP,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    FrameError,
    FrameWalker,
    frame,
)


class Recorder:
    def __init__(self, replace: bytes | None = None) -> None:
        self.blocks: list[tuple[int, int, bytes]] = []
        self.ended: list[int] = []
        self.resets: list[tuple[int, int]] = []
        self.replace = replace

    def headers(
        self, stream_id: int, flags: int, buffer: bytes, start: int, end: int
    ) -> bytes | None:
        self.blocks.append((stream_id, flags, bytes(buffer[start:end])))
        return self.replace  # None: unchanged

    def walker(self, *, preface: bool = False) -> FrameWalker:
        return FrameWalker(
            self.headers,
            preface=preface,
            ended=self.ended.append,
            reset=lambda stream_id, code: self.resets.append((stream_id, code)),
        )


def feed_in_pieces(walker: FrameWalker, data: bytes, piece: int) -> bytes:
    out = b""
    for offset in range(0, len(data), piece):
        out += b"".join(bytes(chunk) for chunk in walker.feed(data[offset : offset + piece]))
        while walker.backlog:
            out += b"".join(bytes(chunk) for chunk in walker.feed(b""))
    return out


PASS_THROUGH = (
    frame(SETTINGS, 0x1, 0, b"")  # an ACK
    + frame(DATA, 0, 1, b"\x00\x00\x00\x00\x05hello")
    + frame(PING, 0, 0, b"12345678")
    + frame(WINDOW_UPDATE, 0, 0, (65535).to_bytes(4, "big"))
    + frame(DATA, 0, 3, bytes(40000))
    + frame(0xFA, 0, 0, b"an extension frame type")
)


@pytest.mark.parametrize("piece", [1, 7, 9, 100, 1 << 20])
def test_frames_pass_unchanged_however_the_bytes_arrive(piece: int) -> None:
    recorder = Recorder()
    data = PREFACE + PASS_THROUGH
    assert feed_in_pieces(recorder.walker(preface=True), data, piece) == data


def test_end_of_stream_and_resets_are_reported() -> None:
    recorder = Recorder()
    recorder.walker().feed(
        frame(DATA, END_STREAM, 5, b"x") + frame(RST_STREAM, 0, 7, (8).to_bytes(4, "big"))
    )
    assert recorder.ended == [5]
    assert recorder.resets == [(7, 8)]


def test_a_stream_ends_once_its_last_data_frame_has_passed_whole() -> None:
    recorder = Recorder()
    walker = recorder.walker()
    last = frame(DATA, END_STREAM, 5, bytes(1000))
    walker.feed(last[:500])
    assert recorder.ended == []  # the rest of the frame is still to be relayed
    walker.feed(last[500:999])
    assert recorder.ended == []
    walker.feed(last[999:])
    assert recorder.ended == [5]


def test_settings_always_carry_a_header_table_size_of_zero() -> None:
    entries = (0x1).to_bytes(2, "big") + (4096).to_bytes(4, "big")
    entries += (0x3).to_bytes(2, "big") + (100).to_bytes(4, "big")
    out = b"".join(
        Recorder().walker().feed(frame(SETTINGS, 0, 0, entries) + frame(SETTINGS, 0, 0, b""))
    )
    expected_first = (
        (0x3).to_bytes(2, "big") + (100).to_bytes(4, "big") + (0x1).to_bytes(2, "big") + bytes(4)
    )
    assert out == frame(SETTINGS, 0, 0, expected_first) + frame(
        SETTINGS, 0, 0, (0x1).to_bytes(2, "big") + bytes(4)
    )


def test_a_header_block_over_continuations_is_handed_over_whole_and_resent() -> None:
    recorder = Recorder(replace=b"NEW")
    padded = bytes([3]) + bytes(5) + b"part1" + b"pad"  # pad length, priority, fragment, padding
    data = (
        frame(HEADERS, END_STREAM | PADDED | PRIORITY_FLAG, 9, padded)
        + frame(CONTINUATION, 0, 9, b"part2")
        + frame(CONTINUATION, END_HEADERS, 9, b"part3")
        + frame(DATA, 0, 1, b"after")
    )
    out = feed_in_pieces(recorder.walker(), data, 4)
    assert recorder.blocks == [(9, END_STREAM | PADDED | PRIORITY_FLAG, b"part1part2part3")]
    assert out == frame(HEADERS, END_STREAM | END_HEADERS, 9, b"NEW") + frame(DATA, 0, 1, b"after")


def test_an_unchanged_single_headers_frame_goes_out_as_it_came() -> None:
    recorder = Recorder()
    data = frame(HEADERS, END_HEADERS, 1, b"block")
    out = recorder.walker().feed(data)
    assert b"".join(out) == data
    assert out[0] is data  # the input itself, not a rebuilt frame


def test_large_blocks_are_split_into_frames_any_peer_accepts() -> None:
    recorder = Recorder(replace=bytes(40000))
    out = b"".join(recorder.walker().feed(frame(HEADERS, END_HEADERS, 1, b"x")))
    assert out == (
        frame(HEADERS, 0, 1, bytes(16384))
        + frame(CONTINUATION, 0, 1, bytes(16384))
        + frame(CONTINUATION, END_HEADERS, 1, bytes(40000 - 2 * 16384))
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "preface", id="not-http2"),
        pytest.param(
            PREFACE + frame(HEADERS, 0, 1, b"a") + frame(DATA, 0, 1, b"b"),
            "interrupted",
            id="header-block-interrupted",
        ),
        pytest.param(
            PREFACE + frame(CONTINUATION, END_HEADERS, 1, b"a"),
            "CONTINUATION",
            id="stray-continuation",
        ),
        pytest.param(PREFACE + frame(SETTINGS, 0, 0, b"12345"), "multiple of 6", id="bad-settings"),
        pytest.param(  # each entry costs a step: 2,730 cost 2.5 ms at one control frame's price
            PREFACE + frame(SETTINGS, 0, 0, bytes(6) * 33), "33 entries", id="settings-flood"
        ),
        pytest.param(
            PREFACE + frame(HEADERS, PADDED | END_HEADERS, 1, b"\x09ab"),
            "padding",
            id="bad-padding",
        ),
        pytest.param(PREFACE + frame(0x5, END_HEADERS, 1, b"\x00\x00\x00\x02"), "PUSH_PROMISE",
                     id="push-promise"),
        pytest.param(PREFACE + frame(RST_STREAM, 0, 1, bytes(5000)), "4 bytes", id="long-reset"),
        pytest.param(PREFACE + frame(RST_STREAM, 0, 0, bytes(4)), "stream 0", id="reset-stream-0"),
        pytest.param(PREFACE + frame(SETTINGS, 0, 1, b""), "on a stream", id="settings-on-stream"),
        pytest.param(
            PREFACE + frame(SETTINGS, 0, 0, b"") + frame(SETTINGS, 0x1, 0, bytes(6)),
            "ACK with a payload",
            id="settings-ack-payload",
        ),
        pytest.param(
            PREFACE + frame(WINDOW_UPDATE, 0, 0, bytes(4)), "increment of 0", id="window-update-0"
        ),
        pytest.param(
            PREFACE + frame(WINDOW_UPDATE, 0, 1, bytes(5)), "4 bytes", id="long-window-update"
        ),
        pytest.param(PREFACE + frame(PRIORITY, 0, 1, bytes(4)), "5 bytes", id="short-priority"),
        pytest.param(
            PREFACE + frame(HEADERS, 0, 1, b"a") + frame(CONTINUATION, 0, 1, b"") * 2000,
            "too large",
            id="continuation-flood",
        ),
    ],
)  # fmt: skip
def test_broken_framing_is_refused(data: bytes, message: str) -> None:
    walker = Recorder().walker(preface=True)
    with pytest.raises(FrameError, match=message):
        walker.feed(data)
        while walker.backlog:  # a pass walks a bounded number of frames
            walker.feed(b"")


@pytest.mark.parametrize("piece", [1, 5, 1000])
def test_pings_are_taken_out_for_an_answer_and_their_acks_dropped(piece: int) -> None:
    pings: list[bytes] = []
    walker = FrameWalker(lambda *_: None, preface=False, ping=pings.append)
    data = (
        frame(DATA, 0, 1, b"before")
        + frame(PING, 0, 0, b"12345678")
        + frame(PING, 0x1, 0, b"ackackac")  # an ACK: answers a ping this side never relayed
        + frame(DATA, 0, 1, b"after")
    )
    out = feed_in_pieces(walker, data, piece)
    assert out == frame(DATA, 0, 1, b"before") + frame(DATA, 0, 1, b"after")
    assert pings == [b"12345678"]


def test_a_ping_on_a_stream_is_refused() -> None:
    walker = FrameWalker(lambda *_: None, preface=False, ping=lambda _: None)
    with pytest.raises(FrameError, match="PING frame on a stream"):
        walker.feed(frame(PING, 0, 1, b"12345678"))


def test_a_goaway_is_reported_and_passed_on_unchanged() -> None:
    last: list[int] = []
    walker = FrameWalker(lambda *_: None, preface=False, goaway=last.append)
    goaway = frame(GOAWAY, 0, 0, (5).to_bytes(4, "big") + bytes(4) + b"debug data")
    assert feed_in_pieces(walker, goaway, 3) == goaway
    assert last == [5]


def test_data_payloads_are_reported_piece_by_piece_without_padding() -> None:
    seen: list[tuple[int, bytes]] = []
    walker = FrameWalker(
        lambda *_: None,
        preface=False,
        data=lambda stream_id, buffer, start, end: seen.append((stream_id, buffer[start:end])),
    )
    padded = frame(DATA, PADDED, 3, bytes((2,)) + b"padded" + b"\x00\x00")
    out = feed_in_pieces(walker, frame(DATA, 0, 1, b"0123456789") + padded, 4)
    assert out == frame(DATA, 0, 1, b"0123456789") + padded
    assert b"".join(chunk for stream_id, chunk in seen if stream_id == 1) == b"0123456789"
    assert [chunk for stream_id, chunk in seen if stream_id == 3] == [b"padded"]


def test_frames_of_our_own_wait_for_the_peers_settings_and_for_a_frame_boundary() -> None:
    walker = Recorder().walker(preface=False)
    assert not walker.at_frame_boundary  # nothing may precede the peer's SETTINGS
    walker.feed(frame(SETTINGS, 0, 0, b""))
    assert walker.at_frame_boundary
    walker.feed(frame(DATA, 0, 1, bytes(100))[:50])  # in the middle of a DATA frame
    assert not walker.at_frame_boundary
    walker.feed(bytes(59))
    assert walker.at_frame_boundary


def test_a_pass_walks_a_bounded_number_of_frames_and_the_rest_waits() -> None:
    walker = Recorder().walker(preface=False)
    priorities = frame(SETTINGS, 0, 0, b"") + frame(PRIORITY, 0, 1, bytes(5)) * 5000
    first = b"".join(bytes(chunk) for chunk in walker.feed(priorities))
    assert walker.backlog
    assert 0 < len(first) < len(priorities) and (len(first) - 15) % 14 == 0  # whole frames
    rest = b""
    while walker.backlog:
        rest += b"".join(bytes(chunk) for chunk in walker.feed(b""))
    assert first + rest == frame(SETTINGS, 0, 0, bytes.fromhex("000100000000")) + priorities[9:]
    assert walker.control_frames == 5000


def test_a_dropped_stream_is_left_out_and_its_data_reported_for_flow_control() -> None:
    credited: list[int] = []
    drop_stream = 3

    def headers(stream_id: int, flags: int, buffer: bytes, start: int, end: int) -> object:
        return DROP if stream_id == drop_stream else None

    walker = FrameWalker(
        headers,  # type: ignore[arg-type]
        preface=False,
        dropped_data=credited.append,
        ended=lambda stream_id: None,
    )
    kept = frame(HEADERS, END_HEADERS, 1, b"block") + frame(DATA, 0, 1, b"kept")
    left_out = (
        frame(HEADERS, END_HEADERS, 3, b"refused")
        + frame(DATA, 0, 3, bytes(1000))
        + frame(WINDOW_UPDATE, 0, 3, (10).to_bytes(4, "big"))
        + frame(PRIORITY, 0, 3, bytes(5))
        + frame(DATA, PADDED | END_STREAM, 3, bytes((4,)) + bytes(20))
    )
    after = frame(WINDOW_UPDATE, 0, 1, (10).to_bytes(4, "big")) + frame(DATA, END_STREAM, 1, b"x")
    for piece in (1, 7, 100_000):
        credited.clear()
        walker = FrameWalker(headers, preface=False, dropped_data=credited.append)  # type: ignore[arg-type]
        walker.feed(frame(SETTINGS, 0, 0, b""))
        assert feed_in_pieces(walker, kept + left_out + after, piece) == kept + after
        assert sum(credited) == 1000 + 21  # padding and its length byte are flow-controlled
        # Its END_STREAM ended it on both sides; it is kept, so that what the caller may
        # still send on it (a WINDOW_UPDATE, an RST_STREAM) never reaches the other side.
        assert walker.feed(frame(WINDOW_UPDATE, 0, 3, (1).to_bytes(4, "big"))) == []
        assert walker.dropped == {3: 0}


def test_a_reset_of_a_dropped_stream_is_left_out_and_ends_it() -> None:
    resets: list[tuple[int, int]] = []
    walker = FrameWalker(
        lambda *_: DROP,  # type: ignore[arg-type,return-value]
        preface=False,
        reset=lambda stream_id, code: resets.append((stream_id, code)),
    )
    walker.feed(frame(SETTINGS, 0, 0, b""))
    out = walker.feed(frame(HEADERS, END_HEADERS, 1, b"x") + frame(RST_STREAM, 0, 1, bytes(4)))
    assert b"".join(bytes(chunk) for chunk in out) == b""
    assert resets == []
    late = frame(WINDOW_UPDATE, 0, 1, (1).to_bytes(4, "big")) + frame(PRIORITY, 0, 1, bytes(5))
    assert b"".join(bytes(chunk) for chunk in walker.feed(late)) == b""  # still left out


def test_a_held_stream_stays_left_out_after_its_sender_ends_it_until_it_resets_it() -> None:
    """A health Watch: answered here, open after the caller's END_STREAM; its caller's
    later WINDOW_UPDATEs are left out, and its reset is reported (the answers stop)."""
    resets: list[tuple[int, int]] = []
    walker = FrameWalker(
        lambda *_: DROP,  # type: ignore[arg-type,return-value]
        preface=False,
        reset=lambda stream_id, code: resets.append((stream_id, code)),
    )
    walker.feed(frame(SETTINGS, 0, 0, b""))
    walker.drop(1, held=True)  # as the splice does before its DROP is acted on
    out = walker.feed(
        frame(HEADERS, END_HEADERS, 1, b"x")
        + frame(DATA, END_STREAM, 1, b"request")
        + frame(WINDOW_UPDATE, 0, 1, (7).to_bytes(4, "big"))
    )
    assert b"".join(bytes(chunk) for chunk in out) == b""
    assert 1 in walker.dropped and walker.sender_ended(1)
    out = walker.feed(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
    assert b"".join(bytes(chunk) for chunk in out) == b""
    assert resets == [(1, 8)] and walker.dropped == {1: 0}  # over, and still left out


def test_a_released_held_stream_is_no_longer_held_and_its_frames_still_left_out() -> None:
    walker = FrameWalker(lambda *_: DROP, preface=False)  # type: ignore[arg-type,return-value]
    walker.feed(frame(SETTINGS, 0, 0, b""))
    walker.drop(1, held=True)
    walker.feed(frame(HEADERS, END_HEADERS, 1, b"x"))
    assert not walker.sender_ended(1)
    walker.release(1)  # answered to its end here
    assert b"".join(bytes(c) for c in walker.feed(frame(DATA, END_STREAM, 1, b"late"))) == b""
    assert walker.dropped == {1: 0}


def test_the_connection_window_the_splice_used_is_taken_from_the_senders_updates() -> None:
    """DATA of the splice's own took 10 bytes of the caller's window: its next connection
    WINDOW_UPDATEs are relayed less those 10, so the app is never given window it did not
    use; stream updates and later ones pass unchanged."""
    walker = FrameWalker(lambda *_: None, preface=False)  # type: ignore[arg-type,return-value]
    walker.feed(frame(SETTINGS, 0, 0, b""))
    walker.window_debt = 10

    def update(stream_id: int, increment: int) -> bytes:
        return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))

    def relayed(data: bytes) -> bytes:
        return b"".join(bytes(chunk) for chunk in walker.feed(data))

    assert relayed(update(3, 5)) == update(3, 5)  # a stream's: not the connection's window
    assert relayed(update(0, 4)) == b""  # all of it repays
    assert relayed(update(0, 100) + update(3, 1)) == update(0, 94) + update(3, 1)
    assert walker.window_debt == 0
    assert relayed(update(0, 100)) == update(0, 100)


def test_control_frames_and_data_frames_are_counted() -> None:
    walker = Recorder().walker(preface=False)
    walker.feed(
        frame(SETTINGS, 0, 0, b"")  # the preface's SETTINGS: not counted
        + frame(SETTINGS, 0, 0, b"")
        + frame(PRIORITY, 0, 1, bytes(5))
        + frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big"))
        + frame(RST_STREAM, 0, 1, bytes(4))
        + frame(DATA, 0, 1, b"")  # empty, not ending the stream
        + frame(DATA, END_STREAM, 3, b"")  # an empty half-close costs a token too
        + frame(PING, 0x1, 0, b"12345678")  # an ACK: nothing on this side pinged
        + frame(0xFA, 0, 0, b"extension")
        + frame(HEADERS, END_HEADERS, 5, b"block")
        + frame(DATA, 0, 5, b"payload")
    )
    assert (walker.control_frames, walker.data_frames) == (8, 2)


def test_settings_to_a_peer_carry_the_lower_header_list_limit() -> None:
    seen: list[int] = []
    walker = FrameWalker(
        lambda *_: None, preface=False, header_list_limit=16384, header_list=seen.append
    )
    entry = (0x6).to_bytes(2, "big") + (65536).to_bytes(4, "big")
    out = b"".join(bytes(chunk) for chunk in walker.feed(frame(SETTINGS, 0, 0, entry)))
    table_zero = bytes.fromhex("000100000000")
    assert out == frame(SETTINGS, 0, 0, table_zero + bytes.fromhex("000600004000"))
    assert seen == [65536]
    lower = (0x6).to_bytes(2, "big") + (4096).to_bytes(4, "big")
    out = b"".join(bytes(chunk) for chunk in walker.feed(frame(SETTINGS, 0, 0, lower)))
    assert out == frame(SETTINGS, 0, 0, table_zero + bytes.fromhex("000600001000"))


def test_a_started_block_is_held_and_reported_as_unfinished() -> None:
    walker = Recorder().walker(preface=False)
    walker.feed(frame(SETTINGS, 0, 0, b""))
    walker.feed(frame(HEADERS, 0, 1, b"part"))
    assert walker.in_frame
    walker.feed(frame(CONTINUATION, END_HEADERS, 1, b"rest"))
    assert not walker.in_frame
    walker.feed(frame(HEADERS, END_HEADERS, 3, b"whole")[:7])
    assert walker.in_frame


def test_grpc_cores_true_binary_metadata_is_not_negotiated_through_the_splice() -> None:
    """With it, -bin values would cross raw (NUL first), which RFC 9113 8.2.1 forbids."""
    walker = Recorder().walker(preface=False)
    true_binary = (0xFE03).to_bytes(2, "big") + (1).to_bytes(4, "big")
    window = (0x4).to_bytes(2, "big") + (65535).to_bytes(4, "big")
    out = b"".join(
        bytes(chunk) for chunk in walker.feed(frame(SETTINGS, 0, 0, true_binary + window))
    )
    assert out == frame(SETTINGS, 0, 0, window + bytes.fromhex("000100000000"))


def test_the_senders_initial_window_and_its_updates_on_held_streams_are_read() -> None:
    """What the splice's own answers on a held stream may send: the caller's
    SETTINGS_INITIAL_WINDOW_SIZE, and its WINDOW_UPDATEs on the stream (left out)."""
    given: list[tuple[int, int]] = []
    walker = FrameWalker(
        lambda *_: DROP,  # type: ignore[arg-type,return-value]
        preface=False,
        held_window=lambda stream_id, increment: given.append((stream_id, increment)),
    )
    assert walker.initial_window == 65_535  # RFC 9113's default
    walker.feed(frame(SETTINGS, 0, 0, (0x4).to_bytes(2, "big") + (7).to_bytes(4, "big")))
    assert walker.initial_window == 7
    walker.drop(1, held=True)
    walker.drop(3)
    out = walker.feed(
        frame(HEADERS, END_HEADERS, 1, b"x")
        + frame(HEADERS, END_HEADERS, 3, b"x")
        + frame(WINDOW_UPDATE, 0, 1, (70).to_bytes(4, "big"))
        + frame(WINDOW_UPDATE, 0, 3, (5).to_bytes(4, "big"))
    )
    assert b"".join(bytes(chunk) for chunk in out) == b""
    assert given == [(1, 70)]  # a held stream's only
