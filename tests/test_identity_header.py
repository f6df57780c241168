"""The caller's identity for the app: a caller-supplied x-forwarded-client-cert never reaches
the app, on either data plane, whatever its encoding or framing (the header-block fuzz in
tests/fuzz/test_identity_spoof_fuzz.py covers the encodings)."""

from __future__ import annotations

import pytest

from sidecar.h2.frames import CONTINUATION, DATA, END_HEADERS, END_STREAM, HEADERS
from tests.conftest import Pki, SidecarFactory
from tests.hostile.peers import RawPeer, message, request_block
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"
SPOOF = ("x-forwarded-client-cert", 'Hash=00;Subject="CN=admin";URI=spiffe://example.org/admin')


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_callers_own_identity_header_never_reaches_the_app(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, data_plane: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", data_plane)
    with sidecar.channel(pki, "alice") as alice:
        unary = alice.unary_unary(UNARY)
        assert unary(b"x", timeout=10, metadata=[SPOOF, ("x-trace", "t1")]) == b"x"
    (seen,) = probe.wait_for_calls(1)
    assert ("x-trace", "t1") in seen.metadata
    assert all(key != SPOOF[0] for key, _ in seen.metadata), seen.metadata


def test_split_across_continuation_frames_it_is_still_dropped(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice")
    block = request_block(UNARY, (("x-trace", "t2"), SPOOF))
    cut = len(block) - 20  # inside the spoofed field, the block's last (its value: 58 bytes)
    with RawPeer(sidecar.port, pki, "alice") as peer:
        peer.settle()
        peer.send_frame(HEADERS, 0, 1, block[:cut])
        peer.send_frame(CONTINUATION, END_HEADERS, 1, block[cut:])
        peer.send_frame(DATA, END_STREAM, 1, message(b"y"))
        assert peer.status(1)["grpc-status"] == "0"
    (seen,) = probe.wait_for_calls(1)
    assert ("x-trace", "t2") in seen.metadata
    assert all(key != SPOOF[0] for key, _ in seen.metadata), seen.metadata
