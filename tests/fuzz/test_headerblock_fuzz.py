"""RequestBlocks and ResponseBlocks against hpack: a connection's blocks, made by hpack's
encoder (Huffman or not, table size updates, never-indexed fields, before and after the
client acknowledges our table size of 0), sometimes mutated or random.

For requests, what the app decodes must be exactly what the caller's block means (hpack's
decoder, the oracle) minus the fields that do not cross, plus the sidecar's user-agent, or
the request is refused: RequestRefused (the call is answered, the connection goes on) or
HeaderBlockError (the connection ends); a malformed request always, an ordinary request an
encoder made never. For responses, the status read must be hpack's, or HeaderBlockError.
No other exception, ever.
"""

from __future__ import annotations

import hpack
from hypothesis import event, given
from hypothesis import strategies as st

from sidecar.auth.headers import HeaderRules
from sidecar.h2.headerblock import (
    HeaderBlockError,
    RequestBlocks,
    RequestFilter,
    RequestRefused,
    ResponseBlocks,
    grpc_message,
    status_block,
)
from tests.fuzz.header_lists import (
    Field,
    crosses,
    malformed_request,
    ordinary_request,
    ordinary_response,
    request_trailers,
    requests,
    responses,
)
from tests.fuzz.streams import mutated

USER_AGENT = b"sidecar/fuzz"


def new_filter() -> RequestFilter:
    return RequestFilter(HeaderRules(USER_AGENT.decode()))


class Client:
    """A peer's HPACK encoder through one connection, with the decoder that reads its blocks
    as the peer meant them (hpack's, the oracle), and where it is in the table-size handshake.
    Until our SETTINGS (table size 0) arrive, a few blocks in, it may resize its table as it
    likes; then it applies the 0 (its next block opens with the update) and acknowledges it,
    at once (RFC 9113 6.5.3) or, now and then, a block later."""

    def __init__(self, data: st.DataObject) -> None:
        self.encoder = hpack.Encoder()
        self.oracle = hpack.Decoder()
        self.applied = False
        self.acked = False
        self._settings_at = data.draw(st.integers(0, 4), label="settings arrive at step")
        self._step = 0

    def next_block(
        self, data: st.DataObject, fields: st.SearchStrategy[list[Field]]
    ) -> tuple[bytes, bool] | None:
        """The next block and whether the encoder made it as it is, or None for a step of
        the handshake (`acked` tells whether it is over)."""
        step, self._step = self._step, self._step + 1
        if step >= self._settings_at and not self.acked:
            if not self.applied:
                self.encoder.header_table_size = 0
                self.applied = True
                if not data.draw(st.integers(0, 4)):
                    return None  # acknowledged a step later
            # The decoder may hold the encoder to 0 from the acknowledgement on.
            self.oracle.max_allowed_table_size = 0
            self.acked = True
            return None
        action = data.draw(st.sampled_from(["block"] * 6 + ["resize", "mutate", "cut", "random"]))
        if action == "resize" and not self.applied:
            self.encoder.header_table_size = data.draw(
                st.one_of(st.sampled_from([0, 4096]), st.integers(0, 4096))
            )
            return None
        if action == "random":
            return data.draw(st.binary(max_size=80)), False
        self._signal_as_rfc_7541()
        block = self.encoder.encode(data.draw(fields), huffman=data.draw(st.booleans()))
        if action == "mutate":
            return data.draw(mutated(block)), False
        if action == "cut":  # a block that ends anywhere, a representation cut short
            last = max(0, len(block) - 1)  # often within its first representations
            return block[: data.draw(st.integers(0, min(last, 6)) | st.integers(0, last))], False
        return block, True

    def _signal_as_rfc_7541(self) -> None:
        """hpack's encoder signals every table size change since its last block; RFC 7541 4.2
        has an encoder signal at most two, the lowest and the final (the sidecar refuses a
        block opening with more, a bound on hostile peers): as grpc-core, grpc-go and nghttp2 do."""
        changes = self.encoder.table_size_changes
        if len(changes) > 2:
            self.encoder.table_size_changes = [min(changes), changes[-1]]

    def meaning(self, block: bytes) -> list[hpack.HeaderTuple] | None:
        try:
            return list(self.oracle.decode(block, raw=True))
        except hpack.HPACKError:
            return None


def _phase(blocks: RequestBlocks | ResponseBlocks) -> str:
    """For the statistics only (the fuzz must reach both phases): whether blocks are decoded
    against the table or scanned alone."""
    return "table followed" if getattr(blocks, "_decoder", None) is not None else "stateless"


def _is_never_indexed(fields: list[hpack.HeaderTuple]) -> list[bool]:
    return [isinstance(field, hpack.NeverIndexedHeaderTuple) for field in fields]


@given(st.data())
def test_the_app_decodes_what_the_caller_meant_minus_what_does_not_cross(
    data: st.DataObject,
) -> None:
    client, app, blocks = Client(data), hpack.Decoder(), RequestBlocks(new_filter())
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        trailers = data.draw(st.integers(0, 5), label="trailers") == 0
        step = client.next_block(data, request_trailers() if trailers else requests())
        if step is None:
            if client.acked:  # the splice's walker reports the acknowledgement
                blocks.table_limited()
            continue
        block, from_encoder = step
        meant = client.meaning(block)
        event(f"from_encoder={from_encoder} oracle_reads={meant is not None}")
        ours = [] if trailers else [(b"user-agent", USER_AGENT)]
        try:
            rewritten, path = blocks.rewrite(block, trailers=trailers)
            event(f"crossed, {_phase(blocks)}")
        except (HeaderBlockError, RequestRefused) as error:
            event(f"refused: {type(error).__name__}")
            if from_encoder and meant is not None:
                assert not ordinary_request(meant, trailers=trailers), f"refused: {error}"
            if isinstance(error, HeaderBlockError):
                return  # the connection ends
            continue  # the splice answers the call itself; the connection goes on
        if meant is None:
            # Unreadable to the oracle: what the app gets, if it can read it, is still
            # only well-formed fields that cross.
            try:
                seen = list(app.decode(rewritten, raw=True))
            except hpack.HPACKError:
                return
            assert seen[len(seen) - len(ours) :] == ours
            theirs = seen[: len(seen) - len(ours)]
            assert all(crosses(name) for name, _ in theirs)
            assert malformed_request(theirs, trailers=trailers) is None
            return
        assert malformed_request(meant, trailers=trailers) is None, "a malformed request crossed"
        kept = [field for field in meant if crosses(field[0])]
        seen = list(app.decode(rewritten, raw=True))
        assert seen == kept + ours
        # RFC 7541 6.2.3: an intermediary keeps a never-indexed field never indexed.
        assert _is_never_indexed(seen[: len(kept)]) == _is_never_indexed(kept)
        paths = [value for name, value in meant if name == b":path"]
        assert path == (paths[-1] if paths else None)


@given(st.data())
def test_the_status_read_from_responses_is_hpacks(data: st.DataObject) -> None:
    server, blocks = Client(data), ResponseBlocks()
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        step = server.next_block(data, responses())
        if step is None:
            if server.acked:
                blocks.table_limited()
            continue
        block, from_encoder = step
        meant = server.meaning(block)
        event(f"from_encoder={from_encoder} oracle_reads={meant is not None}")
        try:
            grpc_status, http_status = blocks.status(block)
            event(f"read, {_phase(blocks)}")
        except HeaderBlockError as error:
            if from_encoder and meant is not None:
                assert not ordinary_response(meant), f"an ordinary response refused: {error}"
            return
        if meant is None:
            return  # unreadable: whatever the access log says, the block crossed unchanged
        statuses = [value for name, value in meant if name == b"grpc-status"]
        http_statuses = [value for name, value in meant if name == b":status"]
        assert grpc_status == (statuses[-1] if statuses else None)
        assert http_status == (http_statuses[-1] if http_statuses else None)


@given(st.data())
def test_the_sidecars_own_status_blocks_read_alike_anywhere_in_a_connection(
    data: st.DataObject,
) -> None:
    """The splice ends calls itself (refused requests, a lost upstream) with status_block,
    between blocks of the upstream's encoder: the caller must read exactly that status,
    and its table must stay the upstream's (the next block still reads as meant)."""
    server, caller = hpack.Encoder(), hpack.Decoder()
    for response in data.draw(st.lists(responses(), max_size=4), label="before"):
        caller.decode(server.encode(response, huffman=data.draw(st.booleans())), raw=True)
    code = data.draw(st.integers(0, 16), label="code")
    message = data.draw(st.binary(max_size=64).map(lambda b: bytes(c & 0x7F | 0x20 for c in b)))
    trailers_only = data.draw(st.booleans(), label="trailers only")
    details = message.decode("ascii")
    block = status_block(code, details, trailers_only=trailers_only)
    expected = [(b":status", b"200"), (b"content-type", b"application/grpc")] * trailers_only
    expected += [(b"grpc-status", str(code).encode()), (b"grpc-message", grpc_message(details))]
    assert list(caller.decode(block, raw=True)) == expected
    assert ResponseBlocks().status(block) == (str(code).encode(), b"200" if trailers_only else None)
    after = data.draw(responses(), label="after")
    assert list(caller.decode(server.encode(after), raw=True)) == [tuple(f) for f in after]
