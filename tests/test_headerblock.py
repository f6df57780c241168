"""Header blocks on the spliced path, against hpack's own encoder and decoder as the peers."""

from __future__ import annotations

import hpack
import pytest

from sidecar.headerblock import HeaderBlockError, RequestBlocks, ResponseBlocks

USER_AGENT = b"sidecar/test"


def request(path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "grpc-go/1.33.3"),
        ("grpc-timeout", "9S"),
        ("grpc-accept-encoding", "gzip"),
        *extra,
    ]


EXTRA = (
    ("x-trace", "abc"),
    ("grpc-custom", "reserved"),
    ("connection", "keep-alive"),
    ("x-trace", "second"),
    ("x-bin", "AAE"),
)
EXPECTED = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":path", b"/kv.KV/Get"),
    (b":authority", b"localhost"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"9S"),
    (b"grpc-accept-encoding", b"gzip"),
    (b"x-trace", b"abc"),
    (b"x-trace", b"second"),
    (b"x-bin", b"AAE"),
    (b"user-agent", USER_AGENT),
]


@pytest.mark.parametrize("huffman", [True, False])
def test_requests_are_filtered_before_and_after_the_table_goes_to_zero(huffman: bool) -> None:
    client, upstream = hpack.Encoder(), hpack.Decoder()
    blocks = RequestBlocks(USER_AGENT)
    # Before the client has seen our SETTINGS it indexes freely: later blocks refer
    # to entries of earlier ones.
    for _ in range(3):
        rewritten, path = blocks.rewrite(client.encode(request("/kv.KV/Get", *EXTRA), huffman))
        assert path == b"/kv.KV/Get"
        assert upstream.decode(rewritten, raw=True) == EXPECTED
    # Then it acknowledges HEADER_TABLE_SIZE=0: its next block opens with a size update.
    blocks.table_limited()
    client.header_table_size = 0
    for _ in range(3):
        rewritten, path = blocks.rewrite(client.encode(request("/kv.KV/Get", *EXTRA), huffman))
        assert path == b"/kv.KV/Get"
        assert upstream.decode(rewritten, raw=True) == EXPECTED


def test_stateless_blocks_keep_their_representations_byte_for_byte() -> None:
    client = hpack.Encoder()
    client.header_table_size = 0
    blocks = RequestBlocks(USER_AGENT)
    blocks.table_limited()  # the client acknowledged our SETTINGS
    blocks.rewrite(client.encode([(":method", "POST")]))  # opens with the size update
    # With no table, blocks encoded apart concatenate into one valid block.
    before = client.encode([(":method", "POST"), (":path", "/a/B"), ("x-k", "v")])
    dropped = client.encode([("user-agent", "grpc-go/1.33.3"), ("grpc-custom", "x")])
    after = client.encode([("x-other", "w")])
    rewritten, _ = blocks.rewrite(before + dropped + after)
    assert rewritten[: len(before) + len(after)] == before + after
    tail = hpack.Decoder().decode(rewritten[len(before) + len(after) :], raw=True)
    assert tail == [(b"user-agent", USER_AGENT)]


def test_trailers_give_the_status_in_both_phases() -> None:
    upstream = hpack.Encoder()
    blocks = ResponseBlocks()
    headers = [(":status", "200"), ("content-type", "application/grpc")]
    trailers = [("grpc-status", "5"), ("grpc-message", "no such key")]
    # A :status the static table has only by name is sent as a literal.
    not_grpc = [(":status", "503"), ("content-type", "text/plain")]
    for table_size in (4096, 0):
        upstream.header_table_size = table_size
        if table_size == 0:
            blocks.table_limited()
        assert blocks.status(upstream.encode(headers)) == (None, b"200")
        assert blocks.status(upstream.encode(trailers)) == (b"5", None)
        assert blocks.status(upstream.encode(not_grpc)) == (None, b"503")


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"\x00\x05ab", id="name-cut-short"),
        pytest.param(b"\x7f", id="integer-cut-short"),
        pytest.param(b"\x00\x01a\x7f\xff\xff\xff\xff\xff\x01", id="huge-length"),
        pytest.param(b"\x04", id="name-without-value"),
        pytest.param(b"\x00", id="literal-without-name"),
    ],
)
def test_malformed_blocks_are_refused(block: bytes) -> None:
    blocks = RequestBlocks(USER_AGENT)
    blocks.table_limited()
    blocks.rewrite(b"\x20")  # size update to 0: stateless from here
    with pytest.raises(HeaderBlockError):
        blocks.rewrite(block)


@pytest.mark.parametrize("stateless", [False, True])
def test_names_in_uppercase_are_judged_by_their_lowercase_form(stateless: bool) -> None:
    client, upstream = hpack.Encoder(), hpack.Decoder()
    blocks = RequestBlocks(USER_AGENT)
    if stateless:
        blocks.table_limited()
        client.header_table_size = 0
    # hpack's encoder lowercases names: encode them as literals by hand.
    sneaky = b"".join(
        b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value
        for name, value in (
            (b"User-Agent", b"evil"), (b"GRPC-X", b"1"), (b"Connection", b"close"), (b"X-Ok", b"v")
        )
    )  # fmt: skip
    rewritten, _ = blocks.rewrite(client.encode([(":method", "POST")]) + sneaky)
    assert upstream.decode(rewritten, raw=True) == [
        (b":method", b"POST"),
        (b"X-Ok", b"v"),
        (b"user-agent", USER_AGENT),
    ]


def test_a_stateless_block_cannot_refer_to_the_dynamic_table() -> None:
    blocks = RequestBlocks(USER_AGENT)
    blocks.table_limited()
    blocks.rewrite(b"\x20")
    with pytest.raises(HeaderBlockError, match="table entry 62"):
        blocks.rewrite(bytes([0x80 | 62]))


def test_a_malformed_block_in_the_stateful_phase_is_refused() -> None:
    with pytest.raises(HeaderBlockError):
        RequestBlocks(USER_AGENT).rewrite(bytes([0x80 | 70]))


def test_multi_byte_integers_are_read_in_every_position() -> None:
    blocks = RequestBlocks(USER_AGENT)
    blocks.table_limited()
    blocks.rewrite(b"\x20")
    long_value = b"v" * 300  # a length that needs a second byte
    # user-agent as a literal without indexing: static index 58 needs 4 + 8 bits.
    user_agent = b"\x0f\x2b" + b"\x05" + b"go/1."
    application = b"\x00\x05x-big\x7f\xad\x01" + long_value  # 127 + 0x2d + 0x80 = 300
    block = b"\x84" + user_agent + application  # :path / (static 4), then the two fields
    rewritten, path = blocks.rewrite(block)
    assert path == b"/"
    assert hpack.Decoder().decode(rewritten, raw=True) == [
        (b":path", b"/"),
        (b"x-big", long_value),
        (b"user-agent", USER_AGENT),
    ]


def test_never_indexed_fields_stay_never_indexed_when_re_encoded() -> None:
    """RFC 7541 6.2.3: an intermediary keeps the never-indexed representation."""
    encoder = hpack.Encoder()
    block = encoder.encode(
        [(":path", "/a.B/C"), hpack.NeverIndexedHeaderTuple("x-secret", "s3cret")], huffman=False
    )
    rewritten, _ = RequestBlocks(b"sidecar/test").rewrite(block)  # the stateful phase
    assert b"\x10\x08x-secret\x06s3cret" in rewritten
    decoded = hpack.Decoder().decode(rewritten, raw=True)
    assert any(isinstance(field, hpack.NeverIndexedHeaderTuple) for field in decoded)


def test_a_reset_before_the_settings_ack_can_be_followed_by_growth() -> None:
    """Until the client acknowledges our SETTINGS its table may grow again after a
    reset to 0 (RFC 7541 4.2); the blocks that use it must still be read."""
    client, upstream = hpack.Encoder(), hpack.Decoder()
    blocks = RequestBlocks(USER_AGENT)
    client.header_table_size = 0
    blocks.rewrite(client.encode(request("/kv.KV/Get")))
    client.header_table_size = 4096  # grows again, and indexes
    for _ in range(2):
        rewritten, path = blocks.rewrite(client.encode(request("/kv.KV/Put", ("x-k", "v"))))
        assert path == b"/kv.KV/Put"
        assert (b"x-k", b"v") in upstream.decode(rewritten, raw=True)
