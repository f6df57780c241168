"""A request stream the client never half-closed never reaches the app with END_STREAM.

grpc.aio ends a server's request iterator the same way for a half-close and for a
cancel (or an expired deadline); a naive relay forwards END_STREAM and then
RST_STREAM, and an app that commits on half-close commits a truncated upload. A raw
HTTP/2 tap stands in for the app and records how each stream ended, on both data
planes, with one request message (a unary-looking stream) and with two.

On the per-call plane (`--data-plane grpc`) a cancel is caught only once grpc core
has reported it (see relay._confirm_half_close): deadlines here are long enough that
the stream ends after the relay's first 20 ms, where that holds; the README says what
shorter ones still risk under load.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.h2_observer import H2Observer

CLIENT_STREAM = "/probe.Probe/ClientStream"
BIDI = "/probe.Probe/Bidi"
MESSAGE = b"part"
FRAMED = 5 + len(MESSAGE)  # gRPC length-prefixed message

PLANES = {"splice": (), "grpc": ("--data-plane", "grpc")}


@pytest.fixture
def observer() -> Iterator[H2Observer]:
    upstream = H2Observer()
    yield upstream
    upstream.close()


@pytest.fixture(params=list(PLANES))
def sidecar(
    request: pytest.FixtureRequest, sidecars: SidecarFactory, observer: H2Observer
) -> SidecarProcess:
    return sidecars.serving(observer.port, "--allow-cn", "alice", *PLANES[request.param])


def held_requests(count: int, hold: threading.Event) -> Iterator[bytes]:
    """count messages, then the stream stays open until hold is set: never a half-close."""
    for _ in range(count):
        yield MESSAGE
    hold.wait()


@pytest.mark.parametrize("method", [CLIENT_STREAM, BIDI])
@pytest.mark.parametrize("messages", [1, 2])
def test_cancelled_request_stream_reaches_the_app_as_reset_without_end_stream(
    sidecar: SidecarProcess, pki: Pki, observer: H2Observer, messages: int, method: str
) -> None:
    rounds = 40  # a leak is a race: many rounds, so one would show
    with sidecar.channel(pki) as channel:
        for round_number in range(rounds):
            hold = threading.Event()
            if method == BIDI:
                call = channel.stream_stream(method)(held_requests(messages, hold))
            else:
                call = channel.stream_unary(method).future(held_requests(messages, hold))
            observer.wait(lambda n=round_number: len(observer.stream_ids) > n)
            stream = observer.stream_ids[round_number]
            observer.wait(lambda s=stream: observer.data_bytes[s] >= messages * FRAMED)
            call.cancel()
            observer.wait(lambda s=stream: observer.endings[s])
            hold.set()
            assert observer.endings[stream][0] == "reset", (
                f"round {round_number}: the app saw {observer.endings[stream]}"
            )


@pytest.mark.parametrize("messages", [1, 2])
def test_expired_deadline_reaches_the_app_as_reset_without_end_stream(
    sidecar: SidecarProcess, pki: Pki, observer: H2Observer, messages: int
) -> None:
    """Deadlines expire while the request is on its way to the app and after it got
    there; whenever the app saw the call, it must see it end in a reset."""
    hold = threading.Event()
    with sidecar.channel(pki) as channel:
        bidi = channel.stream_stream(BIDI)
        for deadline_ms in range(50, 101, 2):
            call = bidi(held_requests(messages, hold), timeout=deadline_ms / 1000)
            with pytest.raises(grpc.RpcError) as raised:
                list(call)
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    hold.set()
    # Every stream the app saw is ended by the sidecar (its copy of the deadline).
    assert_no_expired_call_reached_the_app_half_closed(observer)


@pytest.mark.parametrize("messages", [1, 2])
def test_half_closed_request_stream_reaches_the_app_as_end_stream(
    sidecar: SidecarProcess, pki: Pki, observer: H2Observer, messages: int
) -> None:
    """The control: the tap does see END_STREAM when the client half-closes."""
    with sidecar.channel(pki) as channel:
        call = channel.stream_unary(CLIENT_STREAM).future(iter([MESSAGE] * messages))
        observer.wait(lambda: observer.stream_ids)
        stream = observer.stream_ids[0]
        observer.wait(lambda: observer.endings[stream])
        assert observer.endings[stream][0] == "end_stream"
        assert observer.data_bytes[stream] == messages * FRAMED
        call.cancel()


def assert_no_expired_call_reached_the_app_half_closed(observer: H2Observer) -> None:
    """Once the sidecar has ended every stream the app saw, none of them ended with
    END_STREAM (a half-close the client never sent)."""
    observer.wait(lambda: all(observer.endings[s] for s in observer.stream_ids))
    assert observer.stream_ids, "no call reached the app: the test shows nothing"
    half_closed = [s for s in observer.stream_ids if observer.endings[s][0] == "end_stream"]
    assert not half_closed, (
        f"{len(half_closed)} of {len(observer.stream_ids)} expired calls reached the app "
        "half-closed"
    )


def open_raw_h2(port: int, pki: Pki) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    """A TLS connection as alice speaking HTTP/2 by hand: it sends only what it is told."""
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.pem"))
    context.load_cert_chain(str(pki.cert("alice")), str(pki.key("alice")))
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
    )
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    connection.initiate_connection()
    sock.sendall(connection.data_to_send())
    return sock, connection


def test_deadline_passing_at_the_sidecar_reaches_the_app_as_reset_without_end_stream(
    sidecars: SidecarFactory, pki: Pki, observer: H2Observer
) -> None:
    """A client that neither half-closes nor resets: only the sidecar's own copy of the
    deadline ends the call (grpc clients reset at theirs, often before the sidecar's).
    The per-call plane knows its deadline passed, so this case needs no race to be won."""
    process = sidecars.serving(observer.port, "--allow-cn", "alice", *PLANES["grpc"])
    sock, connection = open_raw_h2(process.port, pki)
    with sock:
        for n, timeout_ms in enumerate(range(10, 100, 5)):
            stream = 1 + 2 * n
            connection.send_headers(
                stream,
                [
                    (":method", "POST"),
                    (":scheme", "https"),
                    (":path", BIDI),
                    (":authority", "localhost"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    ("grpc-timeout", f"{timeout_ms}m"),
                ],
            )
            connection.send_data(stream, b"\x00" + len(MESSAGE).to_bytes(4, "big") + MESSAGE)
            sock.sendall(connection.data_to_send())
            ended = False
            while not ended:  # the sidecar ends the call: trailers or a reset
                for event in connection.receive_data(sock.recv(65536)):
                    if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        ended = ended or event.stream_id == stream
                sock.sendall(connection.data_to_send())
    assert_no_expired_call_reached_the_app_half_closed(observer)
