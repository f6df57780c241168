"""A cancelled request stream reaches the upstream as a cancel, never as a half-close first.

grpc.aio ends a server's request iterator the same way for a half-close and for a
cancel; a naive relay forwards END_STREAM and then RST_STREAM, and an upstream
that commits on half-close commits a truncated stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.conftest import Pki, SidecarFactory
from tests.h2_observer import H2Observer

CLIENT_STREAM = "/probe.Probe/ClientStream"
MESSAGE = b"part"
FRAMED = 5 + len(MESSAGE)  # gRPC length-prefixed message


@pytest.fixture
def observer() -> Iterator[H2Observer]:
    upstream = H2Observer()
    yield upstream
    upstream.close()


def test_cancelled_client_stream_reaches_upstream_as_reset_without_end_stream(
    sidecars: SidecarFactory, pki: Pki, observer: H2Observer
) -> None:
    process = sidecars.serving(observer.port, "--allow-cn", "alice")
    rounds = 100  # the guard is timing-based: many rounds, so a leak would show
    with process.channel(pki) as channel:
        upload = channel.stream_unary(CLIENT_STREAM)
        for round_number in range(rounds):
            hold = threading.Event()

            def requests(hold: threading.Event = hold) -> Iterator[bytes]:
                yield MESSAGE
                yield MESSAGE
                hold.wait()  # the client never half-closes: it cancels

            call = upload.future(requests())
            observer.wait(lambda n=round_number: len(observer.stream_ids) > n)
            stream = observer.stream_ids[round_number]
            observer.wait(lambda s=stream: observer.data_bytes[s] >= 2 * FRAMED)
            call.cancel()
            observer.wait(lambda s=stream: observer.endings[s])
            hold.set()
            assert observer.endings[stream][0] == "reset", (
                f"round {round_number}: upstream saw {observer.endings[stream]}"
            )


def test_half_closed_client_stream_reaches_upstream_as_end_stream(
    sidecars: SidecarFactory, pki: Pki, observer: H2Observer
) -> None:
    """The control: the observer does see END_STREAM when the client half-closes."""
    process = sidecars.serving(observer.port, "--allow-cn", "alice")
    with process.channel(pki) as channel:
        call = channel.stream_unary(CLIENT_STREAM).future(iter([MESSAGE, MESSAGE]))
        observer.wait(lambda: observer.stream_ids)
        stream = observer.stream_ids[0]
        observer.wait(lambda: observer.endings[stream])
        assert observer.endings[stream][0] == "end_stream"
        assert observer.data_bytes[stream] == 2 * FRAMED
        call.cancel()
