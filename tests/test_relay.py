"""The relay is correct to the letter of gRPC: call types, metadata, status, deadlines, sizes."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_status import rpc_status

from tests.conftest import Chain, Pki, SidecarFactory, SidecarProcess
from tests.probe import INIT_HEADERS, TRAILERS, Probe

UNARY = "/probe.Probe/Unary"
SERVER_STREAM = "/probe.Probe/ServerStream"
CLIENT_STREAM = "/probe.Probe/ClientStream"
BIDI = "/probe.Probe/Bidi"
MIB = 1024 * 1024


@pytest.fixture(params=["ingress", "egress-ingress", "ingress-grpc"])
def sidecar(
    request: pytest.FixtureRequest, sidecars: SidecarFactory, probe: Probe
) -> SidecarProcess | Chain:
    """Every relay behaviour holds through one ingress sidecar, through an egress
    sidecar in front of it (client -> egress -> mTLS -> ingress -> upstream), and
    through an ingress on the per-call data plane (data_plane: grpc)."""
    if request.param == "ingress":
        return sidecars.serving(probe.port, "--allow-cn", "alice")
    if request.param == "ingress-grpc":
        return sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", "grpc")
    return sidecars.chain(probe.port)


def md_of(metadata: object) -> list[tuple[str, str | bytes]]:
    return [(item.key, item.value) for item in metadata]  # type: ignore[attr-defined]


def test_unary_call_is_relayed(sidecar: SidecarProcess, pki: Pki, probe: Probe) -> None:
    with sidecar.channel(pki) as channel:
        assert channel.unary_unary(UNARY)(b"ping", timeout=10) == b"ping"
    assert probe.calls[0].requests == [b"ping"]


def test_server_streaming_call_is_relayed(sidecar: SidecarProcess, pki: Pki) -> None:
    with sidecar.channel(pki) as channel:
        replies = list(
            channel.unary_stream(SERVER_STREAM)(b"m", timeout=10, metadata=[("x-probe-count", "5")])
        )
    assert replies == [b"m0", b"m1", b"m2", b"m3", b"m4"]


def test_client_streaming_call_is_relayed(sidecar: SidecarProcess, pki: Pki, probe: Probe) -> None:
    with sidecar.channel(pki) as channel:
        reply = channel.stream_unary(CLIENT_STREAM)(iter([b"a", b"b", b"c"]), timeout=10)
    assert reply == b"abc"
    assert probe.calls[0].requests == [b"a", b"b", b"c"]


def test_bidi_streaming_call_is_relayed_message_by_message(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    requests: queue.Queue[bytes | None] = queue.Queue()

    def request_stream() -> Iterator[bytes]:
        while (item := requests.get()) is not None:
            yield item

    with sidecar.channel(pki) as channel:
        responses = channel.stream_stream(BIDI)(request_stream(), timeout=10)
        for word in (b"one", b"two", b"three"):
            requests.put(word)
            assert next(responses) == word  # each echo arrives before the next request is sent
        requests.put(None)
        assert list(responses) == []


def test_request_metadata_is_forwarded_minus_reserved_keys(
    sidecar: SidecarProcess, pki: Pki, probe: Probe
) -> None:
    sent = [
        ("x-app", "one"),
        ("x-app", "two"),
        ("x-blob-bin", b"\x00\x01\xff"),
        ("grpc-custom", "reserved prefix"),
        ("connection", "keep-alive"),
    ]
    with sidecar.channel(pki) as channel:
        channel.unary_unary(UNARY)(b"x", timeout=10, metadata=sent)
    seen = probe.calls[0]
    assert seen.md("x-app") == ["one", "two"]
    assert seen.md("x-blob-bin") == [b"\x00\x01\xff"]
    assert seen.md("grpc-custom") == []
    assert seen.md("connection") == []
    (user_agent,) = seen.md("user-agent")
    assert str(user_agent).startswith("sidecar/"), "the caller's user-agent must not be forwarded"


@pytest.mark.parametrize("method", [UNARY, SERVER_STREAM])
def test_response_headers_arrive_before_the_first_message(
    sidecar: SidecarProcess, pki: Pki, probe: Probe, method: str
) -> None:
    gate = probe.gate("headers")
    metadata = [("x-probe-headers", "1"), ("x-probe-gate", "headers")]
    with sidecar.channel(pki) as channel:
        # grpc's unary clients report headers only together with the reply; a
        # one-message stream call is the same on the wire and reports them on arrival.
        call = channel.stream_stream(method)(iter([b"x"]), timeout=10, metadata=metadata)
        # The upstream holds its first message until the gate opens: the headers
        # must already be with the client.
        assert md_of(call.initial_metadata()) == list(INIT_HEADERS)
        gate.set()
        assert list(call)


def test_trailers_are_relayed_on_success(sidecar: SidecarProcess, pki: Pki) -> None:
    with sidecar.channel(pki) as channel:
        _, call = channel.unary_unary(UNARY).with_call(
            b"x", timeout=10, metadata=[("x-probe-trailers", "1")]
        )
    assert md_of(call.trailing_metadata()) == list(TRAILERS)


ALL_ERROR_CODES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]


@pytest.mark.parametrize("code", ALL_ERROR_CODES, ids=lambda c: c.name)
def test_every_status_code_passes_through_with_details_and_trailers(
    sidecar: SidecarProcess, pki: Pki, code: grpc.StatusCode
) -> None:
    metadata = [
        ("x-probe-status", str(code.value[0])),
        ("x-probe-details-bin", f"upstream says {code.name} ✓".encode()),
        ("x-probe-trailers", "1"),
    ]
    with sidecar.channel(pki) as channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(UNARY)(b"x", timeout=10, metadata=metadata)
    error = raised.value
    assert error.code() == code
    assert error.details() == f"upstream says {code.name} ✓"
    assert md_of(error.trailing_metadata()) == list(TRAILERS)


@pytest.mark.parametrize("method", [UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI])
def test_error_without_message_passes_through_for_every_call_type(
    sidecar: SidecarProcess, pki: Pki, method: str
) -> None:
    metadata = [("x-probe-status", str(grpc.StatusCode.FAILED_PRECONDITION.value[0]))]
    with sidecar.channel(pki) as channel, pytest.raises(grpc.RpcError) as raised:
        if method == UNARY:
            channel.unary_unary(method)(b"x", timeout=10, metadata=metadata)
        elif method == SERVER_STREAM:
            list(channel.unary_stream(method)(b"x", timeout=10, metadata=metadata))
        elif method == CLIENT_STREAM:
            channel.stream_unary(method)(iter([b"x"]), timeout=10, metadata=metadata)
        else:
            list(channel.stream_stream(method)(iter([b"x"]), timeout=10, metadata=metadata))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert raised.value.details() in ("", None)


def test_rich_error_status_details_pass_through(sidecar: SidecarProcess, pki: Pki) -> None:
    from google.rpc import error_details_pb2

    metadata = [
        ("x-probe-status", str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])),
        ("x-probe-details", "slow down"),
        ("x-probe-rich", "1"),
    ]
    with sidecar.channel(pki) as channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(UNARY)(b"x", timeout=10, metadata=metadata)
    status = rpc_status.from_call(raised.value)
    assert status is not None and status.message == "slow down"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("QUOTA", "probe.example")


def test_errors_after_messages_keep_the_messages_and_the_status(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    metadata = [("x-probe-count", "2"), ("x-probe-status", "9"), ("x-probe-details", "late")]
    received = []
    with sidecar.channel(pki) as channel, pytest.raises(grpc.RpcError) as raised:
        for message in channel.unary_stream(SERVER_STREAM)(b"m", timeout=10, metadata=metadata):
            received.append(message)
    assert received == [b"m0", b"m1"]
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert raised.value.details() == "late"


def test_unknown_method_gets_the_upstreams_unimplemented_every_time(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    # The upstream answers before reading the request: a relay that writes the
    # request in a batch of its own races that answer, and grpc.aio then reports
    # INTERNAL "Internal error from Core" instead of the upstream's status.
    codes = set()
    with sidecar.channel(pki) as channel:
        unknown = channel.unary_unary("/probe.Probe/NoSuchMethod")
        for _ in range(200):
            with pytest.raises(grpc.RpcError) as raised:
                unknown(b"x", timeout=10)
            codes.add(raised.value.code())
    assert codes == {grpc.StatusCode.UNIMPLEMENTED}


def test_client_deadline_is_passed_to_the_upstream(
    sidecar: SidecarProcess, pki: Pki, probe: Probe
) -> None:
    with sidecar.channel(pki) as channel:
        channel.unary_unary(UNARY)(b"x", timeout=5)
    remaining = probe.calls[0].time_remaining
    assert remaining is not None and 3 < remaining <= 5


def test_no_client_deadline_stays_no_deadline(
    sidecar: SidecarProcess, pki: Pki, probe: Probe
) -> None:
    with sidecar.channel(pki) as channel:
        channel.unary_unary(UNARY)(b"x")
    remaining = probe.calls[0].time_remaining
    assert remaining is None or remaining > 10**6  # grpc reports "infinite" one way or the other


def test_expired_deadline_cancels_the_upstream_call(
    sidecar: SidecarProcess, pki: Pki, probe: Probe
) -> None:
    with sidecar.channel(pki) as channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(UNARY)(b"x", timeout=0.5, metadata=[("x-probe-gate", "never")])
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (seen,) = probe.wait_for_calls(1)
    assert seen.woke.wait(10)
    assert seen.cancelled


@pytest.mark.parametrize("method", [UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI])
def test_client_cancel_cancels_the_upstream_call(
    sidecar: SidecarProcess, pki: Pki, probe: Probe, method: str
) -> None:
    hold = threading.Event()

    def held_requests() -> Iterator[bytes]:
        yield b"x"
        hold.wait()  # keep the request stream open: a cancel, never a half-close

    metadata = [("x-probe-gate", f"cancel-{method}")]
    with sidecar.channel(pki) as channel:
        if method == UNARY:
            call = channel.unary_unary(method).future(b"x", metadata=metadata)
        elif method == SERVER_STREAM:
            call = channel.unary_stream(method)(b"x", metadata=metadata)
        elif method == CLIENT_STREAM:
            call = channel.stream_unary(method).future(held_requests(), metadata=metadata)
        else:
            call = channel.stream_stream(method)(held_requests(), metadata=metadata)
        (seen,) = probe.wait_for_calls(1)
        call.cancel()
        assert seen.woke.wait(10), "the upstream call was not ended by the client's cancel"
        assert seen.cancelled
        hold.set()


def test_upstream_cancelling_reaches_the_client_as_cancelled(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    metadata = [("x-probe-count", "1"), ("x-probe-status", str(grpc.StatusCode.CANCELLED.value[0]))]
    with sidecar.channel(pki) as channel, pytest.raises(grpc.RpcError) as raised:
        list(channel.unary_stream(SERVER_STREAM)(b"x", timeout=10, metadata=metadata))
    assert raised.value.code() == grpc.StatusCode.CANCELLED


def test_sixteen_mebibyte_messages_pass_both_ways(sidecar: SidecarProcess, pki: Pki) -> None:
    payload = bytes(range(256)) * (16 * MIB // 256)
    with sidecar.channel(pki) as channel:
        assert channel.unary_unary(UNARY)(payload, timeout=60) == payload
        replies = list(channel.stream_stream(BIDI)(iter([payload, payload[:MIB]]), timeout=60))
    assert [len(reply) for reply in replies] == [16 * MIB, MIB]
    assert replies[0] == payload


def test_gzip_compressed_requests_from_the_client_work(
    sidecar: SidecarProcess, pki: Pki, probe: Probe
) -> None:
    payload = b"compressible " * 1000
    with sidecar.channel(pki) as channel:
        reply = channel.unary_unary(UNARY)(payload, timeout=10, compression=grpc.Compression.Gzip)
    assert reply == payload
    assert probe.calls[0].requests == [payload]


def test_over_a_hundred_concurrent_calls_share_one_connection(
    sidecar: SidecarProcess, pki: Pki, probe: Probe
) -> None:
    parties = 120
    probe.barrier("many", parties)  # every call waits at the upstream until all 120 are there
    with sidecar.channel(pki) as channel:
        unary = channel.unary_unary(UNARY)
        calls = [
            unary.future(str(i).encode(), timeout=60, metadata=[("x-probe-barrier", "many")])
            for i in range(parties)
        ]
        replies = [call.result() for call in calls]
    assert replies == [str(i).encode() for i in range(parties)]
    sidecar.wait_for_count("remote=", parties)  # each call's access line is out
    remotes = {line.split("remote=")[1].split()[0] for line in sidecar.lines if "remote=" in line}
    assert len(remotes) == 1, f"expected one client connection, saw {remotes}"


def test_idle_stream_stays_open(sidecar: SidecarProcess, pki: Pki) -> None:
    requests: queue.Queue[bytes | None] = queue.Queue()
    responses: queue.Queue[bytes | Exception] = queue.Queue()

    def request_stream() -> Iterator[bytes]:
        while (item := requests.get()) is not None:
            yield item

    with sidecar.channel(pki) as channel:
        call = channel.stream_stream(BIDI)(request_stream())

        def read() -> None:
            try:
                for message in call:
                    responses.put(message)
            except grpc.RpcError as error:
                responses.put(error)

        threading.Thread(target=read, daemon=True).start()
        requests.put(b"before")
        assert responses.get(timeout=10) == b"before"
        # The idle period is the behaviour under test: nothing (no error, no reset)
        # may arrive while the stream is quiet...
        with pytest.raises(queue.Empty):
            responses.get(timeout=3)
        # ...and the stream still works afterwards.
        requests.put(b"after")
        assert responses.get(timeout=10) == b"after"
        requests.put(None)


def test_upstream_down_gives_unavailable_naming_the_upstream_then_recovers(
    sidecars: SidecarFactory, pki: Pki
) -> None:
    import socket

    with socket.socket() as placeholder:  # a port with nothing listening on it
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    process = sidecars.serving(port, "--allow-cn", "alice")
    upstream = Probe()
    try:
        with process.channel(pki) as channel:
            unary = channel.unary_unary(UNARY)
            with pytest.raises(grpc.RpcError) as raised:
                unary(b"x", timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"upstream 127.0.0.1:{port} unavailable" in raised.value.details()

            upstream.start(port)
            back = time.monotonic()
            while True:
                try:
                    assert unary(b"x", timeout=10) == b"x"
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() - back < 5, (
                        "calls kept failing after the upstream was back"
                    )
            recovered_after = time.monotonic() - back
        assert recovered_after < 1.0, f"calls succeeded again only {recovered_after:.2f}s after"
    finally:
        upstream.stop()
