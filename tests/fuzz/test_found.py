"""What the fuzz found, each as the smallest input that shows it, kept as regression tests.
The counters and the empty :path failed on the code they were found in (f287fee) and pass
since 22ada9e; the properties of test_frames_fuzz.py / test_headerblock_fuzz.py now demand
the same. Values with whitespace at an end cross, by decision (see that test). DATA on
stream 0 failed on aa80111, where `make fuzz` found it, and passes since 972ca88."""

from __future__ import annotations

import hpack
import pytest

from sidecar.auth.headers import HeaderRules
from sidecar.h2.frames import DATA, DROP, PADDED, WINDOW_UPDATE, FrameError, FrameWalker, frame
from sidecar.h2.headerblock import HeaderBlockError, RequestBlocks, RequestFilter, RequestRefused

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/kv.KV/Get")]


def _counted(walker: FrameWalker, pieces: list[bytes]) -> tuple[int, int]:
    for piece in pieces:
        walker.feed(piece)
    return walker.control_frames, walker.data_frames


def test_a_padded_data_frame_counts_once_however_it_arrives() -> None:
    """The per-connection frame budgets count what the peer sent: a DATA frame read whole
    (padded, with a data callback) was counted again on each walk, so one that arrives in
    two reads counted as two."""
    padded = frame(DATA, PADDED, 1, b"\x02abc\x00\x00")

    def walker() -> FrameWalker:
        return FrameWalker(lambda *_: None, preface=False, data=lambda *_: None)

    assert _counted(walker(), [padded[:12], padded[12:]]) == _counted(walker(), [padded])


def test_a_small_control_frame_counts_once_while_a_stream_is_dropped() -> None:
    """While a stream is dropped, frames of 8 bytes or less are read whole (they may be the
    dropped stream's): one arriving in two reads was counted as two control frames."""
    update = frame(WINDOW_UPDATE, 0, 5, (1).to_bytes(4, "big"))

    def walker() -> FrameWalker:
        dropping = FrameWalker(lambda *_: DROP, preface=False)
        dropping.feed(frame(0x1, 0x4, 3, b"\x82"))  # a request on stream 3, dropped
        return dropping

    assert _counted(walker(), [update[:10], update[10:]]) == _counted(walker(), [update])


@pytest.mark.parametrize("value", [b" leading", b"trailing ", b"\ttab"])
def test_a_request_value_with_whitespace_at_an_end_crosses_as_sent(value: bytes) -> None:
    """RFC 9113 8.2.1 calls such a value malformed, and the fuzz found it crossing. It is
    kept crossing, on purpose: grpc core and grpc-go servers take it (so a client that sends
    one worked straight to the app, and through the grpc plane), and gRPC's spec allows
    spaces in ASCII values. Decided after the review found a grpcio client's "hello " refused."""
    block = hpack.Encoder().encode([*REQUEST, (b"x-id", value)])
    rewritten, _ = RequestBlocks(RequestFilter(HeaderRules("sidecar/test"))).rewrite(block)
    assert (b"x-id", value) in list(hpack.Decoder().decode(rewritten, raw=True))


def test_a_request_with_an_empty_path_is_refused() -> None:
    """RFC 9113 8.3.1: ":path ... MUST NOT be empty for "http" or "https" URIs"; the request
    is malformed (8.1.1). It crossed with an empty :path."""
    block = hpack.Encoder().encode([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"")])
    with pytest.raises((RequestRefused, HeaderBlockError)):
        RequestBlocks(RequestFilter(HeaderRules("sidecar/test"))).rewrite(block)


def _reported(pieces: list[bytes]) -> tuple[bool, list[tuple[int, bytes]]]:
    """(whether the walker refused, the DATA payload it reported per stream, pieces joined)."""
    reported: list[tuple[int, bytes]] = []

    def data(stream_id: int, buffer: bytes, start: int, end: int) -> None:
        if reported and reported[-1][0] == stream_id:
            reported[-1] = (stream_id, reported[-1][1] + buffer[start:end])
        else:
            reported.append((stream_id, bytes(buffer[start:end])))

    walker = FrameWalker(lambda *_: None, preface=False, data=data)
    refused = False
    try:
        for piece in pieces:
            walker.feed(piece)
    except FrameError:
        refused = True
    return refused, [(stream_id, payload) for stream_id, payload in reported if payload]


def test_data_on_stream_0_is_told_alike_however_it_arrives() -> None:
    """DATA on stream 0 (a connection error, RFC 9113 6.1) was passed on, and its payload
    reported to the data callback only as far as the read holding its frame header went:
    the stream of a DATA frame in progress is kept as 0 for "not DATA"."""
    data_on_stream_0 = frame(DATA, 0, 0, b"ab")
    whole = _reported([data_on_stream_0])
    assert _reported([data_on_stream_0[:10], data_on_stream_0[10:]]) == whole
