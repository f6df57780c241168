"""A caller's own x-forwarded-client-cert never crosses the splice, however it is encoded:
literal with or without indexing, never indexed, Huffman or not, its name from the static
or dynamic table, its whole field from the dynamic table in a later request, before or
after the client empties its table. The app trusts the header because only the sidecar
can set it."""

from __future__ import annotations

import hpack
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import given
from hypothesis import strategies as st

from sidecar.auth.headers import USER_AGENT, HeaderRules
from sidecar.h2.headerblock import RequestBlocks, RequestFilter

XFCC = "x-forwarded-client-cert"
PSEUDO = [(":method", "POST"), (":scheme", "https"), (":path", "/kv.KV/Get"),
          (":authority", "app")]  # fmt: skip
REGULAR = [("content-type", "application/grpc"), ("te", "trailers"), ("x-trace", "t1")]


def _literal_without_indexing(name: bytes, value: bytes) -> bytes:
    """A field as `0000 0000`, name and value as raw strings (RFC 7541 6.2.2): hpack's
    encoder never writes this form, clients may."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


spoofs = st.lists(
    st.tuples(
        st.sampled_from(["indexed", "never", "without"]),
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
        st.integers(min_value=0, max_value=len(REGULAR)),
    ),
    min_size=1,
    max_size=3,
)


@given(spoofs=spoofs, huffman=st.booleans(), stateless=st.booleans(), repeats=st.integers(1, 3))
def test_a_callers_identity_header_never_crosses(
    spoofs: list[tuple[str, str, int]], huffman: bool, stateless: bool, repeats: int
) -> None:
    client, upstream = hpack.Encoder(), hpack.Decoder()
    blocks = RequestBlocks(RequestFilter(HeaderRules(USER_AGENT)))
    if stateless:
        blocks.table_limited()
        client.header_table_size = 0
    for _ in range(repeats):  # a repeated block may refer to the table entries it made
        fields: list[tuple[str, str] | HeaderTuple] = list(REGULAR)
        raw_tail = b""
        for kind, value, position in spoofs:
            if kind == "without":
                raw_tail += _literal_without_indexing(XFCC.encode(), value.encode())
            elif kind == "never":
                fields.insert(position, NeverIndexedHeaderTuple(XFCC, value))
            else:
                fields.insert(position, (XFCC, value))
        block = client.encode(PSEUDO + fields, huffman) + raw_tail
        rewritten, path = blocks.rewrite(block)
        assert path == b"/kv.KV/Get"
        crossed = upstream.decode(rewritten, raw=True)
        assert all(name != XFCC.encode() for name, _ in crossed), crossed
        assert (b"x-trace", b"t1") in crossed
