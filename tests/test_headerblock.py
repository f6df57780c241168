"""Header blocks on the spliced path, against hpack's own encoder and decoder as the peers."""

from __future__ import annotations

import sys

import hpack
import pytest

from sidecar.auth.headers import HeaderRules
from sidecar.h2.headerblock import (
    HeaderBlockError,
    HeaderLimits,
    RequestBlocks,
    RequestFilter,
    RequestRefused,
    ResponseBlocks,
)

USER_AGENT = b"sidecar/test"


def new_filter() -> RequestFilter:
    """A route's filter with the default rules, naming the sidecar USER_AGENT."""
    return RequestFilter(HeaderRules(USER_AGENT.decode()))


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
    ("host", "elsewhere"),
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
    blocks = RequestBlocks(new_filter())
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


def stateless_blocks(limits: HeaderLimits | None = None) -> RequestBlocks:
    """Blocks of a connection whose client has emptied its table (the stateless phase)."""
    client = hpack.Encoder()
    client.header_table_size = 0
    blocks = RequestBlocks(new_filter(), limits)
    blocks.table_limited()  # the client acknowledged our SETTINGS
    blocks.rewrite(client.encode(request("/a/B")))  # opens with the size update
    return blocks


def test_stateless_blocks_keep_their_representations_byte_for_byte() -> None:
    client = hpack.Encoder()
    client.header_table_size = 0
    blocks = stateless_blocks()
    client.encode([])  # its size update was sent with the first block
    # With no table, blocks encoded apart concatenate into one valid block.
    before = client.encode([(":method", "POST"), (":scheme", "http"), (":path", "/a/B")])
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
    blocks = stateless_blocks()
    with pytest.raises(HeaderBlockError):
        blocks.rewrite(block)


def literal(name: bytes, value: bytes) -> bytes:
    """A literal field with a new name, no Huffman (hpack's encoder lowercases names)."""
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


MALFORMED = [
    pytest.param(literal(b"User-Agent", b"evil"), "'User-Agent' has uppercase", id="uppercase"),
    pytest.param(literal(b"GRPC-X", b"1"), "'GRPC-X' has uppercase", id="uppercase-reserved"),
    pytest.param(literal(b":x-user", b"root"), "pseudo-header ':x-user'", id="unknown-pseudo"),
    pytest.param(literal(b"x y", b"1"), "'x y' has a character", id="space-in-name"),
    pytest.param(literal(b"x:y", b"1"), "'x:y' has a character", id="colon-in-name"),
    pytest.param(literal(b"", b"1"), "empty field name", id="empty-name"),
    pytest.param(literal(b"x-\xff", b"1"), "has a character", id="non-ascii-name"),
    pytest.param(literal(b"x-k", b"a\r\nb"), "holds NUL, CR or LF", id="crlf-in-value"),
    pytest.param(literal(b"x-k", b"a\x00b"), "holds NUL, CR or LF", id="nul-in-value"),
    pytest.param(literal(b"te", b"gzip"), "only 'trailers'", id="te-not-trailers"),
    pytest.param(literal(b":path", b"/a.B/c"), ":path after regular", id="pseudo-after-regular"),
]


@pytest.mark.parametrize("stateless", [False, True])
@pytest.mark.parametrize(("field", "reason"), MALFORMED)
def test_malformed_requests_are_refused_with_the_reason(
    stateless: bool, field: bytes, reason: str
) -> None:
    """RFC 9113 8.2.1, 8.2.2: such a request must not reach the app, whatever the phase."""
    client = hpack.Encoder()
    blocks = stateless_blocks() if stateless else RequestBlocks(new_filter())
    if stateless:
        client.header_table_size = 0
        client.encode([])
    with pytest.raises(RequestRefused, match=reason) as refused:
        blocks.rewrite(client.encode(request("/a/B")) + field)
    assert refused.value.code.name == "INTERNAL"
    assert refused.value.details.startswith("malformed request: ")


def test_a_pseudo_header_after_regular_fields_or_a_missing_one_is_refused() -> None:
    blocks = stateless_blocks()
    client = hpack.Encoder()
    client.header_table_size = 0
    client.encode([])
    late = client.encode(request("/a/B")[1:]) + client.encode([(":method", "POST")])
    with pytest.raises(RequestRefused, match=":method after regular fields"):
        blocks.rewrite(late)
    with pytest.raises(RequestRefused, match="no :method"):
        blocks.rewrite(client.encode(request("/a/B")[1:]))
    with pytest.raises(RequestRefused, match=":method twice"):
        blocks.rewrite(client.encode([(":method", "GET"), *request("/a/B")]))


@pytest.mark.parametrize("stateless", [False, True])
def test_requests_over_the_header_budgets_are_refused_resource_exhausted(stateless: bool) -> None:
    limits = HeaderLimits(list_size=1024, max_fields=20)
    client = hpack.Encoder()
    blocks = stateless_blocks(limits) if stateless else RequestBlocks(new_filter(), limits)
    if stateless:
        client.header_table_size = 0
        client.encode([])
        with pytest.raises(RequestRefused, match="larger than 1024 bytes") as refused:
            blocks.rewrite(client.encode(request("/a/B", ("x-big", "v" * 1000))))
        assert refused.value.code.name == "RESOURCE_EXHAUSTED"
    else:  # with the table in use, the decoder stops at the budget: the connection ends
        with pytest.raises(HeaderBlockError, match="larger than 1024 bytes"):
            blocks.rewrite(client.encode(request("/a/B", ("x-big", "v" * 1000))))
        return
    many = tuple((f"x-{index}", "v") for index in range(12))
    with pytest.raises(RequestRefused, match="more than 20 header fields"):
        blocks.rewrite(client.encode(request("/a/B", *many)))
    # The upstream's own, lower, limit (its SETTINGS_MAX_HEADER_LIST_SIZE) applies too.
    blocks.rewrite(client.encode(request("/a/B", ("x-k", "v" * 300))))
    blocks.lower_list_size(512)
    with pytest.raises(RequestRefused, match="larger than 512 bytes"):
        blocks.rewrite(client.encode(request("/a/B", ("x-k", "v" * 300))))


def test_hpack_amplification_is_bounded_until_the_table_is_empty() -> None:
    """A client that never empties its table: a few indexed bytes stand for a big field."""
    client = hpack.Encoder()
    limits = HeaderLimits(list_size=16384, stateful_bytes=64 * 1024)
    blocks = RequestBlocks(new_filter(), limits)
    big = request("/a/B", ("x-big", "v" * 3000))
    first = client.encode(big)
    again = client.encode(big)  # the big field is now one indexed byte
    assert len(again) < 100 < len(first)
    blocks.rewrite(first)
    with pytest.raises(HeaderBlockError, match="before the client applied a header table size"):
        for _ in range(100):
            blocks.rewrite(again)


def test_a_stateless_block_cannot_refer_to_the_dynamic_table() -> None:
    blocks = stateless_blocks()
    with pytest.raises(HeaderBlockError, match="table entry 62"):
        blocks.rewrite(bytes([0x80 | 62]))


def test_a_malformed_block_in_the_stateful_phase_is_refused() -> None:
    with pytest.raises(HeaderBlockError):
        RequestBlocks(new_filter()).rewrite(bytes([0x80 | 70]))


def test_multi_byte_integers_are_read_in_every_position() -> None:
    blocks = stateless_blocks()
    long_value = b"v" * 300  # a length that needs a second byte
    # user-agent as a literal without indexing: static index 58 needs 4 + 8 bits.
    user_agent = b"\x0f\x2b" + b"\x05" + b"go/1."
    application = b"\x00\x05x-big\x7f\xad\x01" + long_value  # 127 + 0x2d + 0x80 = 300
    # :method POST, :scheme http (static 3, 6), :path /a.B/C (a literal of static name 4),
    # then the two fields
    block = b"\x83\x86" + b"\x04\x06/a.B/C" + user_agent + application
    rewritten, path = blocks.rewrite(block)
    assert path == b"/a.B/C"
    assert hpack.Decoder().decode(rewritten, raw=True) == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/a.B/C"),
        (b"x-big", long_value),
        (b"user-agent", USER_AGENT),
    ]


def test_never_indexed_fields_stay_never_indexed_when_re_encoded() -> None:
    """RFC 7541 6.2.3: an intermediary keeps the never-indexed representation."""
    encoder = hpack.Encoder()
    block = encoder.encode(
        [*request("/a.B/C"), hpack.NeverIndexedHeaderTuple("x-secret", "s3cret")], huffman=False
    )
    rewritten, _ = RequestBlocks(new_filter()).rewrite(block)  # the stateful phase
    assert b"\x10\x08x-secret\x06s3cret" in rewritten
    decoded = hpack.Decoder().decode(rewritten, raw=True)
    assert any(isinstance(field, hpack.NeverIndexedHeaderTuple) for field in decoded)


def test_a_reset_before_the_settings_ack_can_be_followed_by_growth() -> None:
    """Until the client acknowledges our SETTINGS its table may grow again after a
    reset to 0 (RFC 7541 4.2); the blocks that use it must still be read."""
    client, upstream = hpack.Encoder(), hpack.Decoder()
    blocks = RequestBlocks(new_filter())
    client.header_table_size = 0
    blocks.rewrite(client.encode(request("/kv.KV/Get")))
    client.header_table_size = 4096  # grows again, and indexes
    for _ in range(2):
        rewritten, path = blocks.rewrite(client.encode(request("/kv.KV/Put", ("x-k", "v"))))
        assert path == b"/kv.KV/Put"
        assert (b"x-k", b"v") in upstream.decode(rewritten, raw=True)


def test_a_remembered_field_is_judged_again_where_it_stands_and_for_each_request() -> None:
    """Fields are remembered by their bytes (only that a request repeats them is cheap):
    whether the request is well formed, and within budgets, is decided call by call."""
    blocks = stateless_blocks(HeaderLimits(list_size=1024, max_fields=20))
    client = hpack.Encoder()
    client.header_table_size = 0
    client.encode([])
    method = client.encode([(":method", "POST")])
    rest = client.encode(request("/a/B")[1:])
    blocks.rewrite(method + rest)  # both remembered as fine
    with pytest.raises(RequestRefused, match=":method after regular fields"):
        blocks.rewrite(rest + method)
    with pytest.raises(RequestRefused, match=":method twice"):
        blocks.rewrite(method + method + rest)
    big = client.encode([("x-big", "v" * 400)])
    blocks.rewrite(method + rest + big)
    with pytest.raises(RequestRefused, match="larger than 1024 bytes"):
        blocks.rewrite(method + rest + big + big)
    # A value that changes every call (a deadline) is read each time: a bad one is seen.
    with pytest.raises(RequestRefused, match="holds NUL, CR or LF"):
        blocks.rewrite(method + rest + literal(b"grpc-timeout", b"1S\r\n"))


def test_malformed_requests_are_charged_to_the_stateful_budget_too() -> None:
    """Until the table is empty, every decoded byte counts, even those of a request that is
    then refused: a refusal must not be a way around the amplification budget."""
    client = hpack.Encoder()
    blocks = RequestBlocks(new_filter(), HeaderLimits(list_size=16384, stateful_bytes=64 * 1024))
    bad = request("/a/B", ("x-big", "v" * 3000), ("te", "gzip"))
    with pytest.raises(RequestRefused):
        blocks.rewrite(client.encode(bad))
    with pytest.raises(HeaderBlockError, match="before the client applied a header table size"):
        for _ in range(100):
            with pytest.raises(RequestRefused):
                blocks.rewrite(client.encode(bad))


@pytest.mark.parametrize("stateless", [False, True])
def test_more_than_two_table_size_updates_end_the_connection_unread(stateless: bool) -> None:
    """RFC 7541 4.2 allows two at the start of a block; 16,000 one-byte updates made one
    block cost a decoder 30 ms, at one frame's price."""
    blocks = stateless_blocks() if stateless else RequestBlocks(new_filter())
    client = hpack.Encoder()
    client.header_table_size = 0
    client.encode([])
    fine = client.encode(request("/a/B"))
    blocks.rewrite(b"\x20\x20" + fine)
    with pytest.raises(HeaderBlockError, match="more than two table size updates"):
        blocks.rewrite(b"\x20" * 16_000 + fine)


def test_a_stateless_block_may_not_resize_the_table_or_resize_it_late() -> None:
    """Once the client has applied the table size of 0 it was told, an update above 0, or
    one after a field, is an error the app would refuse too: it ends the connection here."""
    client = hpack.Encoder()
    client.header_table_size = 0
    client.encode([])
    fine = client.encode(request("/a/B"))
    for bad in (b"\x3f\xe1\x3f" + fine, fine[:1] + b"\x20" + fine[1:]):
        with pytest.raises(HeaderBlockError, match="table size update"):
            stateless_blocks().rewrite(bad)


@pytest.mark.parametrize("path_length", [8, 440])  # a long Huffman path decodes larger
def test_the_blocks_a_connection_remembers_are_bounded_and_the_oldest_forgotten(
    path_length: int,
) -> None:
    """A client whose every block is new (a hostile one; or deadlines that never repeat)
    costs its connection a bounded amount of remembered blocks (32 KiB, objects and
    decoded paths included), the oldest forgotten first; a forgotten block gets the same
    answer when it comes back."""
    blocks = stateless_blocks(HeaderLimits())
    client = hpack.Encoder()
    client.header_table_size = 0
    client.encode([])
    first = client.encode(request("/kv.KV/Get"))
    answer = blocks.rewrite(first)
    for number in range(5000):
        path = f"/kv.KV/{number}".ljust(path_length, "a")
        blocks.rewrite(client.encode(request(path)))
    remembered = blocks._rewritten
    held = sys.getsizeof(remembered) + sum(
        sys.getsizeof(block) + sys.getsizeof(kept) + sys.getsizeof(kept[0]) + sys.getsizeof(kept[1])
        for block, kept in remembered.items()
    )
    assert 10 < len(remembered) < 5000
    assert held < 40 * 1024, held
    assert first not in remembered
    assert blocks.rewrite(first) == answer
