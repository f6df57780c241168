"""Failing apps: what callers see, and how fast they are served again (issue 12, items 16, 21,
22 and the fault suite).

The app is the probe upstream, in a process of its own (tests/hostile/app.py) when
a test kills it, or a bare TCP server when a test needs an upstream that is not
gRPC at all (one that never speaks, one that speaks HTTP/1.1, one that breaks
HTTP/2 mid-connection). Each test asserts the statuses the callers get, their
details, and the time they took, in generous bounds: the figures themselves are
in the README's "Failing apps".
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest

from bench import toolchain
from tests.conftest import ROOT, ChildProcess, Pki, SidecarFactory, install_debian_packages
from tests.hostile.peers import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Footprint,
    RawPeer,
    frame,
    request_block,
    unary_ok,
)
from tests.hostile.peers import message as grpc_message
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"
HOLD = (("x-probe-gate", "hold"),)  # the app holds the call until it ends some other way
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NODE_DIR = ROOT / "tests" / "node"


# The app as a process.


class App:
    """The probe in a process of its own on one port, which a test may kill and restart."""

    def __init__(self) -> None:
        self.processes: list[ChildProcess] = []
        self.port = 0

    def start(self) -> float:
        """Start the app (on the port it had, if any); the monotonic time it listened at."""
        process = ChildProcess(
            [sys.executable, "-m", "tests.hostile.app", "--port", str(self.port)]
        )
        self.processes.append(process)
        self.port = process.wait_ready()
        return time.monotonic()

    @property
    def process(self) -> ChildProcess:
        return self.processes[-1]

    def wait_calls(self, count: int) -> None:
        """Wait until `count` calls have reached the running app."""
        self.process.wait_for(rf"^call {count} ", timeout=10)

    def kill(self) -> float:
        """SIGKILL the app, as a crash would end it; the monotonic time it was killed at."""
        killed = time.monotonic()
        self.process.signal(signal.SIGKILL)
        self.process.wait_exit()
        return killed

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture
def app() -> Iterator[App]:
    running = App()
    running.start()
    yield running
    running.stop()


def _until_ok(call: Callable[[], object], budget: float) -> float:
    """Call (with a short deadline) until it succeeds: the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            call()
            return time.monotonic() - started
        except grpc.RpcError as error:
            if time.monotonic() - started > budget:
                raise AssertionError(f"no call succeeded within {budget}s: {error}") from error


def _ended(call: grpc.Future, timeout: float) -> grpc.RpcError:
    """The error a call in flight ended with, waiting at most timeout for it."""
    done = threading.Event()
    call.add_done_callback(lambda _: done.set())
    assert done.wait(timeout), f"the call was still in flight after {timeout}s"
    error = call.exception()
    assert isinstance(error, grpc.RpcError), f"the call ended with {error!r}"
    return error


# Killed and restarted.


def test_app_killed_ends_calls_in_flight_unavailable_naming_it_and_calls_resume_when_back(
    sidecars: SidecarFactory, pki: Pki, app: App
) -> None:
    """SIGKILL with an open bidi stream waiting for its answer and unary calls in flight, on
    one caller connection: each ends at once with UNAVAILABLE naming the app (before the
    fix, a grpcio client waited ~30 s for TCP), the loss is one WARNING, and a call on the
    same channel succeeds as soon as the app listens again."""
    sidecar = sidecars.serving(app.port, "--allow-cn", "alice")
    with sidecar.channel(pki) as channel:
        assert channel.unary_unary(UNARY)(b"warm", timeout=5) == b"warm"
        requests: queue.Queue[bytes | None] = queue.Queue()
        requests.put(b"first")
        stream = channel.stream_stream("/probe.Probe/Bidi")(iter(requests.get, None))
        assert next(stream) == b"first"  # the stream is open; the app waits for more
        unary = [channel.unary_unary(UNARY).future(b"held", metadata=HOLD) for _ in range(4)]
        app.wait_calls(6)

        killed = app.kill()
        errors = [_ended(call, 5) for call in [stream, *unary]]
        ended_after = time.monotonic() - killed
        requests.put(None)
        for error in errors:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert f"upstream 127.0.0.1:{app.port} closed the connection" in error.details()
        assert ended_after < 3, f"calls in flight ended {ended_after:.2f}s after the kill"
        sidecar.wait_for(
            rf"WARNING .*upstream 127\.0\.0\.1:{app.port} closed a connection abruptly.*"
            r"\(5 calls in flight ended UNAVAILABLE\)"
        )

        listening = app.start()
        took = _until_ok(lambda: channel.unary_unary(UNARY)(b"back", timeout=0.2), 5)
        recovered = time.monotonic() - listening
        assert recovered < 2, f"the first call succeeded {recovered:.2f}s after the app listened"
    print(f"calls ended {ended_after:.3f}s after the kill; OK {took:.3f}s after the app was back")


def test_app_killed_under_load_callers_see_only_ok_or_unavailable_and_recover(
    sidecars: SidecarFactory, pki: Pki, app: App
) -> None:
    """Eight callers calling without pause while the app is killed and restarted: every
    failure is UNAVAILABLE (never a deadline, never a hang), and each caller is served
    again soon after the app is back."""
    sidecar = sidecars.serving(app.port, "--allow-cn", "alice")
    stop = threading.Event()
    back = threading.Event()
    codes: list[grpc.StatusCode] = []
    unexpected: list[tuple[str, str, float, float]] = []  # code, details, started, ended
    first_ok_after_back: list[float] = []
    progress = threading.Condition()

    def caller() -> None:
        with sidecar.channel(pki) as channel:
            call = channel.unary_unary(UNARY)
            recovered = False
            while not stop.is_set():
                started = time.monotonic()
                try:
                    call(b"load", timeout=2)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                    if code != grpc.StatusCode.UNAVAILABLE:
                        unexpected.append((code.name, error.details(), started, time.monotonic()))
                with progress:
                    codes.append(code)
                    if code == grpc.StatusCode.OK and back.is_set() and not recovered:
                        recovered = True
                        first_ok_after_back.append(time.monotonic())
                    progress.notify_all()

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        app.wait_calls(50)
        killed = app.kill()
        listening = app.start()
        back.set()
        with progress:
            progress.wait_for(lambda: len(first_ok_after_back) == len(threads), 5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not unexpected, [
        f"{code} {details!r}: started {start - killed:+.3f}s, ended {end - killed:+.3f}s "
        f"from the kill (the app listened again at {listening - killed:+.3f}s)"
        for code, details, start, end in unexpected
    ]
    assert codes.count(grpc.StatusCode.UNAVAILABLE) > 0
    assert len(first_ok_after_back) == len(threads), "a caller was not served again"
    slowest = max(first_ok_after_back) - listening
    assert slowest < 2, f"the last caller was served again {slowest:.2f}s after the app listened"
    print(f"all 8 callers served again within {slowest:.3f}s of the app listening")


def test_app_closing_mid_stream_ends_that_stream_unavailable_and_the_caller_reconnects(
    sidecars: SidecarFactory, pki: Pki, app: App
) -> None:
    """A server stream cut after its first message (the app's connection closed under it):
    the caller reads the message, then UNAVAILABLE naming the app, in trailers."""
    sidecar = sidecars.serving(app.port, "--allow-cn", "alice")
    with sidecar.channel(pki) as channel:
        stream = channel.unary_stream("/probe.Probe/ServerStream")(
            b"s", metadata=(("x-probe-count", "1000000"),)
        )
        assert next(stream) == b"s0"
        app.kill()
        with pytest.raises(grpc.RpcError) as cut:
            for _ in stream:
                pass
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"upstream 127.0.0.1:{app.port} closed the connection" in cut.value.details()
        app.start()
        _until_ok(lambda: channel.unary_unary(UNARY)(b"back", timeout=0.2), 5)


class Ending:
    """What a raw caller read until its connection ended, and how it ended."""

    def __init__(self, peer: RawPeer, timeout: float) -> None:
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.how = ""
        peer.sock.settimeout(timeout)
        data = b""
        while not self.how:
            try:
                chunk = peer.sock.recv(65536)
                self.how = "" if chunk else "closed"
            except ssl.SSLEOFError:  # the TCP connection ended without TLS's close_notify
                self.how, chunk = "cut", b""
            except ConnectionResetError:
                self.how, chunk = "reset", b""
            data += chunk
            while len(data) >= 9 and len(data) >= 9 + int.from_bytes(data[:3], "big"):
                end = 9 + int.from_bytes(data[:3], "big")
                stream_id = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
                self.frames.append((data[3], data[4], stream_id, data[9:end]))
                data = data[end:]

    def on(self, stream_id: int) -> list[tuple[int, int, bytes]]:
        """The frames read on stream_id: kind, flags, payload."""
        return [(kind, flags, payload) for kind, flags, got, payload in self.frames
                if got == stream_id]  # fmt: skip

    def status(self, stream_id: int) -> dict[bytes, bytes]:
        """The fields of the block that ended stream_id (decoding every block in order)."""
        decoder, ended = hpack.Decoder(), None
        for kind, flags, got, payload in self.frames:
            if kind == HEADERS:
                fields = dict(decoder.decode(payload, raw=True))
                if got == stream_id and flags & END_STREAM:
                    ended = fields
        assert ended is not None, f"stream {stream_id} was not ended: {self.frames}"
        return ended

    def goaways(self) -> list[tuple[int, int]]:
        """Each GOAWAY read: last stream id, error code."""
        return [
            (int.from_bytes(payload[:4], "big") & 0x7FFFFFFF, int.from_bytes(payload[4:8], "big"))
            for kind, _, _, payload in self.frames
            if kind == GOAWAY
        ]


def _held_calls(peer: RawPeer, method: str = UNARY) -> None:
    """Two calls the app holds: stream 1 with its request ended, stream 3 still sending."""
    block = request_block(method, HOLD)
    peer.send_frame(HEADERS, END_HEADERS, 1, block)
    peer.send_frame(DATA, END_STREAM, 1, grpc_message(b"done sending"))
    peer.send_frame(HEADERS, END_HEADERS, 3, block)
    peer.send_frame(DATA, 0, 3, grpc_message(b"more to come"))


def test_app_killed_the_caller_reads_each_status_then_goaway_then_a_clean_close(
    sidecars: SidecarFactory, pki: Pki, app: App
) -> None:
    """Frame by frame: each call ends with a trailers-only UNAVAILABLE naming the app, the one
    whose request was not finished also with RST_STREAM NO_ERROR (RFC 9113 8.1: stop
    sending), then GOAWAY NO_ERROR naming the last stream, then TLS's close (not a reset)."""
    sidecar = sidecars.serving(app.port, "--allow-cn", "alice")
    with RawPeer(sidecar.port, pki) as peer:
        _held_calls(peer, "/probe.Probe/Bidi")
        app.wait_calls(2)
        app.kill()
        ending = Ending(peer, 5)
    for stream_id in (1, 3):
        status = ending.status(stream_id)
        assert status[b":status"] == b"200"  # trailers-only: no response had begun
        assert status[b"grpc-status"] == b"14"
        # (": Connection reset by peer" follows when the app died with bytes unread)
        message = b"upstream 127.0.0.1:%d closed the connection" % app.port
        assert status[b"grpc-message"].startswith(message), status
    assert (RST_STREAM, 0, bytes(4)) in ending.on(3)
    assert RST_STREAM not in [kind for kind, _, _ in ending.on(1)]
    assert ending.goaways() == [(3, 0)]
    assert ending.frames[-1][0] == GOAWAY
    assert ending.how == "closed"


@pytest.fixture(scope="module")
def go_faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/go/faults.go, built with grpc-go from Debian's packages."""
    try:
        return toolchain.build_go_program(
            ROOT / "tests" / "go" / "faults.go",
            sorted((ROOT / "protos").glob("*.proto")),
            tmp_path_factory.mktemp("gopath"),
            "sidecar.faults",
        )
    except toolchain.ToolchainError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def node_faults() -> Path:
    """tests/node/faults.js, with @grpc/grpc-js from tests/node's lock file."""
    install_debian_packages(["nodejs", "npm"], ["node", "npm"])
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return NODE_DIR / "faults.js"


def _event(client: ChildProcess, name: str) -> dict[str, Any]:
    """The client's next report of `name` (one JSON object a line)."""
    line = client.wait_for(rf'^{{.*"event":"{name}".*}}$|^{{.*"event":"(failed|gave_up)"')
    event: dict[str, Any] = json.loads(line.string)
    assert event["event"] == name, event
    return event


@pytest.mark.timeout(1200)  # on a fresh machine, Go and Node.js are installed first
@pytest.mark.parametrize("language", ["go", "node"])
def test_app_killed_under_a_grpc_go_or_grpc_js_caller_ends_its_call_and_it_is_served_when_back(
    sidecars: SidecarFactory, pki: Pki, app: App, request: pytest.FixtureRequest, language: str
) -> None:
    """The same crash under grpc-go and grpc-js callers (tests/go/faults.go,
    tests/node/faults.js): the call in flight ends UNAVAILABLE naming the app, and the
    same channel is served again as soon as the app listens."""
    sidecar = sidecars.serving(app.port, "--allow-cn", "alice")
    tls = [str(pki.dir / "ca.pem"), str(pki.cert("alice")), str(pki.key("alice"))]
    target = f"127.0.0.1:{sidecar.port}"
    if language == "go":
        program = request.getfixturevalue("go_faults")
        flags = ["-ca", "-cert", "-key"]
        command = [
            str(program),
            "-target",
            target,
            *(a for f in zip(flags, tls, strict=True) for a in f),
        ]
    else:
        command = ["node", str(request.getfixturevalue("node_faults")), target, *tls]
    client = ChildProcess(command)
    try:
        _event(client, "ready")
        app.wait_calls(2)  # the first call, and the one held
        killed = app.kill()
        ended = _event(client, "ended")
        ended_after = time.monotonic() - killed
        assert ended["code"] == grpc.StatusCode.UNAVAILABLE.value[0], ended
        assert f"upstream 127.0.0.1:{app.port} closed the connection" in ended["message"]
        assert ended_after < 3, f"the call in flight ended {ended_after:.2f}s after the kill"

        listening = app.start()
        client.signal(signal.SIGHUP)
        recovered = _event(client, "recovered")
        back_after = time.monotonic() - listening
        assert back_after < 2, f"the first call succeeded {back_after:.2f}s after the app was back"
        assert client.wait_exit(10) == 0
    finally:
        client.stop()
    print(
        f"{language}: ended {ended_after:.3f}s after the kill; OK {back_after:.3f}s after the "
        f"app was back ({recovered['failures']} calls failed first: "
        f"{recovered['first_failure'] or '-'})"
    )


@pytest.mark.timeout(1200)  # on a fresh machine, Go is installed first
def test_grpc_go_callers_first_call_after_the_app_is_back_succeeds(
    sidecars: SidecarFactory, pki: Pki, app: App, go_faults: Path
) -> None:
    """grpc-go reconnects at once when its connection ends, so after the crash's GOAWAY it
    holds a new connection, made while the app was down: the sidecar answers that one as a
    Refusal, which keeps answering "Connection refused" (until 5 s without a call) after the
    app is back. A call made then must reach the app.

    Failed before the refusal refused later calls unprocessed: the first call after the
    app was back got UNAVAILABLE "upstream 127.0.0.1:PORT unavailable: Connection refused"
    (grpcio and grpc-js clients wait for their next call to reconnect, and were not
    affected). Now that call is refused with REFUSED_STREAM, and grpc-go retries it on a
    new connection, which reaches the app.
    """
    sidecar = sidecars.serving(app.port, "--allow-cn", "alice")
    tls = ["-ca", str(pki.dir / "ca.pem"), "-cert", str(pki.cert("alice"))]
    client = ChildProcess(
        [
            str(go_faults),
            "-target",
            f"127.0.0.1:{sidecar.port}",
            *tls,
            "-key",
            str(pki.key("alice")),
        ]
    )
    try:
        _event(client, "ready")
        app.wait_calls(2)
        app.kill()
        _event(client, "ended")
        # grpc-go's new connection found the app down:
        sidecar.wait_for(rf"WARNING .*upstream 127\.0\.0\.1:{app.port} unavailable: ")
        # The scenario, not a synchronisation: the app is back some time after the new
        # connection was refused. Within the first 0.1 s of it (the refusal's freshness
        # window, for the calls a client held until our SETTINGS), a call still gets the
        # reason; on a fast machine the app restarts in less than that.
        time.sleep(0.3)
        app.start()
        client.signal(signal.SIGHUP)
        recovered = _event(client, "recovered")
    finally:
        client.stop()
    assert recovered["failures"] == 0, recovered["first_failure"]


# Hanging, and speaking something other than HTTP/2.


class BareServer:
    """A TCP server on loopback that handles each connection with `serve(sock)` in a thread."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._serve = serve
        self._connections: list[socket.socket] = []
        self.accepted = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(sock)
            self.accepted.release()
            threading.Thread(target=self._handle, args=(sock,), daemon=True).start()

    def _handle(self, sock: socket.socket) -> None:
        # The sidecar closing the connection is what the tests are about.
        with contextlib.suppress(OSError):
            self._serve(sock)

    def close(self) -> None:
        self._listener.close()
        for sock in self._connections:
            sock.close()


@contextmanager
def bare_server(serve: Callable[[socket.socket], None]) -> Iterator[BareServer]:
    server = BareServer(serve)
    try:
        yield server
    finally:
        server.close()


def _silent(sock: socket.socket) -> None:
    """Accept and never speak (a wedged app, or a port some other program holds)."""
    while sock.recv(65536):
        pass


def _http1(sock: socket.socket) -> None:
    """Answer whatever arrives as an HTTP/1.1 server answers a request it cannot read."""
    if sock.recv(65536):
        sock.sendall(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
            b"Connection: close\r\n\r\nBad Request"
        )
    sock.close()


def _speaks_http2_then(
    answer: bytes, *, hang: bool, split_settings: bool = False
) -> Callable[[socket.socket], None]:
    """A server that opens as an HTTP/2 server does (SETTINGS; split: its first 2 bytes, then
    the rest) and, once a request's HEADERS came, sends `answer`, then hangs (reading) or
    closes."""

    def serve(sock: socket.socket) -> None:
        settings = frame(SETTINGS, 0, 0, b"")
        if split_settings:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(settings[:2])
            # A pause that shapes the bytes into two reads, not a synchronisation: were
            # they read together, the test would only check less.
            time.sleep(0.1)
            settings = settings[2:]
        sock.sendall(settings)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            position = len(PREFACE)
            while position + 9 <= len(received):
                if received[position + 3] == HEADERS:
                    sock.sendall(answer)
                    if hang:
                        _silent(sock)
                    sock.close()
                    return
                position += 9 + int.from_bytes(received[position : position + 3], "big")

    return serve


# An HTTP/1.1 answer read as a frame header is a frame of 4.7 MB: HTTP/2 broken.
_breaks_http2_after_a_request = _speaks_http2_then(b"HTTP/1.1 400 Bad Request\r\n\r\n", hang=True)
# Response headers, then the first 9 of a DATA frame's 100 bytes, then the connection closes.
_closes_in_the_middle_of_a_frame = _speaks_http2_then(
    frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode([(":status", "200"),
                                                          ("content-type", "application/grpc")]))
    + frame(DATA, 0, 1, grpc_message(b"x" * 95))[:18],
    hang=False,
)  # fmt: skip


_RESPONSE = hpack.Encoder()
# A whole gRPC response on stream 1 (the first call of a channel): OK, one message.
_answers_ok_its_settings_split = _speaks_http2_then(
    frame(HEADERS, END_HEADERS, 1, _RESPONSE.encode([(":status", "200"),
                                                    ("content-type", "application/grpc")]))
    + frame(DATA, 0, 1, grpc_message(b"split"))
    + frame(HEADERS, END_HEADERS | END_STREAM, 1, _RESPONSE.encode([("grpc-status", "0")])),
    hang=True,
    split_settings=True,
)  # fmt: skip


def _closes_at_once(sock: socket.socket) -> None:
    sock.close()


def _timed_call(channel: grpc.Channel, timeout: float | None) -> tuple[grpc.StatusCode, str, float]:
    started = time.monotonic()
    try:
        channel.unary_unary(UNARY)(b"x", timeout=timeout)
    except grpc.RpcError as error:
        return error.code(), error.details(), time.monotonic() - started
    raise AssertionError("the call succeeded against an app that cannot answer it")


def test_app_that_accepts_and_never_speaks_is_timed_out_and_deadlines_hold(
    sidecars: SidecarFactory, pki: Pki
) -> None:
    """With --connect-timeout 1: a call without a deadline ends UNAVAILABLE saying the app
    sent nothing, after about 1 s (before, it waited for ever); one with a 0.3 s deadline
    ends DEADLINE_EXCEEDED on time."""
    with bare_server(_silent) as silent:
        sidecar = sidecars.serving(silent.port, "--allow-cn", "alice", "--connect-timeout", "1")
        with sidecar.channel(pki) as patient, sidecar.channel(pki) as hurried:
            no_deadline = patient.unary_unary(UNARY).future(b"x")
            code, _, took = _timed_call(hurried, 0.3)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert took < 0.8, f"a 0.3 s deadline ended after {took:.2f}s"
            error = _ended(no_deadline, 5)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == (
        f"upstream 127.0.0.1:{silent.port} unavailable: "
        "the upstream accepted the connection but sent nothing within 1s"
    )


def test_app_speaking_http1_gets_callers_unavailable_with_what_it_sent(
    sidecars: SidecarFactory, pki: Pki
) -> None:
    with bare_server(_http1) as http1:
        sidecar = sidecars.serving(http1.port, "--allow-cn", "alice")
        with sidecar.channel(pki) as channel:
            code, details, took = _timed_call(channel, 5)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == (
        f"upstream 127.0.0.1:{http1.port} unavailable: the upstream does not speak HTTP/2 "
        "(it sent 'HTTP/1.1 400 Bad Request'...)"
    )
    assert took < 2


def test_app_breaking_http2_mid_connection_ends_calls_in_flight_unavailable_saying_so(
    sidecars: SidecarFactory, pki: Pki
) -> None:
    with bare_server(_breaks_http2_after_a_request) as broken:
        sidecar = sidecars.serving(broken.port, "--allow-cn", "alice")
        with sidecar.channel(pki) as channel:
            code, details, took = _timed_call(channel, 5)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.startswith(f"upstream 127.0.0.1:{broken.port} broke HTTP/2: "), details
    assert took < 2
    sidecar.wait_for(r"WARNING .*upstream broke HTTP/2 on a connection for ipv4:127\.0\.0\.1:")


def test_app_whose_settings_arrive_in_two_reads_is_taken_for_http2(
    sidecars: SidecarFactory, pki: Pki
) -> None:
    """The frame type is the 4th byte of the upstream's first frame: a first read of 2 bytes
    must not decide (it was read from the next read's bytes: "does not speak HTTP/2 (it
    sent '\\x00\\x04\\x00...')" for a valid SETTINGS)."""
    with bare_server(_answers_ok_its_settings_split) as split:
        sidecar = sidecars.serving(split.port, "--allow-cn", "alice")
        with sidecar.channel(pki) as channel:
            assert channel.unary_unary(UNARY)(b"x", timeout=5) == b"split"


def test_app_closing_in_the_middle_of_a_frame_to_the_caller_resets_the_caller_at_once(
    sidecars: SidecarFactory, pki: Pki
) -> None:
    """Half a DATA frame already relayed: nothing more can be said on that connection, so it is
    reset, and the call ends UNAVAILABLE at once (the reason is only in the log)."""
    with bare_server(_closes_in_the_middle_of_a_frame) as cut:
        sidecar = sidecars.serving(cut.port, "--allow-cn", "alice")
        with sidecar.channel(pki) as channel:
            code, details, took = _timed_call(channel, 5)
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert took < 2
    sidecar.wait_for(rf"WARNING .*upstream 127\.0\.0\.1:{cut.port} closed a connection abruptly")


def test_app_closing_before_it_speaks_gets_callers_unavailable_saying_so(
    sidecars: SidecarFactory, pki: Pki
) -> None:
    with bare_server(_closes_at_once) as closing:
        sidecar = sidecars.serving(closing.port, "--allow-cn", "alice")
        with sidecar.channel(pki) as channel:
            code, details, took = _timed_call(channel, 5)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.startswith(f"upstream 127.0.0.1:{closing.port} unavailable: "), details
    # Closed with our preface unread, the kernel resets instead of closing: either reads.
    assert details.endswith(
        ("the connection was closed before the upstream spoke (after any TLS handshake)",
         "Connection reset by peer")
    ), details  # fmt: skip
    assert took < 2


def test_app_that_never_answers_a_call_deadlines_end_on_time_and_it_learns_so(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """A gRPC app stuck in a handler: the caller's deadline ends its call on time, and the
    app's handler sees the call end (the cancel crosses)."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice")
    with sidecar.channel(pki) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as expired:
            channel.unary_unary(UNARY)(b"x", timeout=0.3, metadata=HOLD)
        took = time.monotonic() - started
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 0.8, f"a 0.3 s deadline ended after {took:.2f}s"
    held = probe.wait_for_calls(1)[0]
    assert held.woke.wait(5), "the app's handler never learnt that the call ended"
    assert held.cancelled


# The sidecar stopping, and a caller that does not read.


def test_sigterm_lets_calls_finish_within_the_grace_and_ends_the_rest_saying_why(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """SIGTERM with --drain-grace 1: calls that finish within the grace complete OK; one that
    never finishes ends UNAVAILABLE saying the sidecar is shutting down (before, its
    connection was dropped: "Socket closed", as a network failure reads)."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--drain-grace", "1")
    with sidecar.channel(pki) as channel:
        call = channel.unary_unary(UNARY)
        soon = [call.future(b"soon", metadata=(("x-probe-gate", "soon"),)) for _ in range(4)]
        never = call.future(b"never", metadata=(("x-probe-gate", "never"),))
        probe.wait_for_calls(5)
        signalled = time.monotonic()
        sidecar.signal(signal.SIGTERM)
        sidecar.wait_for("SIGTERM: draining")
        probe.gate("soon").set()
        assert [future.result(timeout=5) for future in soon] == [b"soon"] * 4
        error = _ended(never, 5)
        cut_after = time.monotonic() - signalled
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "the sidecar is shutting down and its drain grace is over"
    assert 0.9 < cut_after < 3, f"the unfinished call was cut {cut_after:.2f}s after SIGTERM"
    assert sidecar.wait_exit(10) == 0


def test_sigterm_under_load_calls_end_ok_or_find_the_sidecar_gone_and_the_drain_ends_early(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """Eight callers calling without pause at SIGTERM (--drain-grace 5): every call the
    sidecar took completes OK; the only failures are calls that found the listener closed;
    and the drain does not wait for the grace, the calls being short."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--drain-grace", "5")
    stop = threading.Event()
    failures: list[tuple[str, str]] = []
    oks: list[int] = []

    def caller() -> None:
        with sidecar.channel(pki) as channel:
            call = channel.unary_unary(UNARY)
            while not stop.is_set():
                try:
                    call(b"load", timeout=2)
                    oks.append(1)
                except grpc.RpcError as error:
                    failures.append((error.code().name, error.details()))

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        probe.wait_for_calls(100)
        signalled = time.monotonic()
        sidecar.signal(signal.SIGTERM)
        assert sidecar.wait_exit(10) == 0
        exited_after = time.monotonic() - signalled
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    print(f"exited {exited_after:.3f}s after SIGTERM; {len(oks)} OK; failures: {set(failures)}")
    assert exited_after < 2.5, f"the drain took {exited_after:.2f}s for calls of a few ms"
    assert oks
    for code, details in failures:
        assert code == "UNAVAILABLE" and "failed to connect" in details, (code, details)


def test_a_call_started_before_the_caller_read_the_drains_goaway_is_relayed_not_refused(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """RFC 9113 6.8: the drain's first GOAWAY comes with a PING, and the last GOAWAY waits
    for its ACK, even once no call is left: a call the caller sent before it read the first
    GOAWAY is relayed and answered, not refused as unprocessed (a refusal makes gRPC clients
    retry it, waiting for a sidecar that is gone until the call's deadline)."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--drain-grace", "5")
    gate = probe.gate("drain-ping")
    with RawPeer(sidecar.port, pki) as peer:
        peer.settle()
        peer.send_frame(
            HEADERS, END_HEADERS, 1, request_block(UNARY, (("x-probe-gate", "drain-ping"),))
        )
        peer.send_frame(DATA, END_STREAM, 1, grpc_message(b"held"))
        probe.wait_for_calls(1)
        sidecar.signal(signal.SIGTERM)
        assert peer.goaway() == (0x7FFFFFFF, 0, b"")
        flags, _, opaque = peer.read_until(PING) or (None, None, b"")
        assert flags == 0, "the drain's PING"
        gate.set()
        assert peer.status(1)["grpc-status"] == "0"
        peer.call(3, UNARY, b"sent before reading the GOAWAY")  # as a client's in-flight call
        assert peer.status(3)["grpc-status"] == "0"
        peer.send_frame(PING, ACK, 0, opaque)
        assert peer.goaway() == (3, 0, b"")
        assert peer.closed_within(5)
    assert [call.method for call in probe.wait_for_calls(2)] == ["Unary", "Unary"]
    assert sidecar.wait_exit(10) == 0


def test_drain_grace_over_the_caller_reads_each_status_then_goaway_then_the_close(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """Frame by frame: the drain's GOAWAY at SIGTERM; at the end of the grace each call left
    ends UNAVAILABLE saying why (and RST_STREAM NO_ERROR where the caller was still
    sending), then a last GOAWAY naming the last stream, then the connection ends."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--drain-grace", "1")
    with RawPeer(sidecar.port, pki) as peer:
        _held_calls(peer, "/probe.Probe/Bidi")
        probe.wait_for_calls(2)
        sidecar.signal(signal.SIGTERM)
        ending = Ending(peer, 5)
    for stream_id in (1, 3):
        status = ending.status(stream_id)
        assert status[b"grpc-status"] == b"14"
        assert (
            status[b"grpc-message"] == b"the sidecar is shutting down and its drain grace is over"
        )
    assert (RST_STREAM, 0, bytes(4)) in ending.on(3)
    assert ending.goaways() == [(0x7FFFFFFF, 0), (3, 0)]
    assert ending.frames[-1][0] == GOAWAY
    assert ending.how == "closed"


def test_a_caller_that_does_not_read_its_stream_costs_bounded_memory_and_no_one_else(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """A server stream of 160 MB to a caller that opened every HTTP/2 window wide and then
    reads nothing: only TCP and the sidecar's write buffers hold it back. The sidecar stays
    within a few MiB, and another caller's calls are served meanwhile."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice")
    footprint = Footprint(sidecar.proc.pid)
    assert unary_ok(sidecar, pki)
    before = footprint.rss_mib
    with RawPeer(sidecar.port, pki, preface=False) as slow:
        wide = 0x7FFFFFFF
        slow.send(
            PREFACE
            + frame(SETTINGS, 0, 0, (0x4).to_bytes(2, "big") + wide.to_bytes(4, "big"))
            + frame(WINDOW_UPDATE, 0, 0, (wide - 65535).to_bytes(4, "big"))
        )
        block = request_block("/probe.Probe/ServerStream", (("x-probe-count", "10000"),))
        slow.send_frame(HEADERS, END_HEADERS, 1, block)
        slow.send_frame(DATA, END_STREAM, 1, grpc_message(b"m" * 16000))
        stream = probe.wait_for_calls(2)[1]
        peak, served, started = before, 0, time.monotonic()
        with sidecar.channel(pki) as channel:
            call = channel.unary_unary(UNARY)
            while time.monotonic() - started < 1.5:  # a window to watch the footprint in
                assert call(b"other", timeout=2) == b"other"
                served += 1
                peak = max(peak, footprint.rss_mib)
        assert not stream.ended.is_set(), "the stream went through: nothing was held back"
    grew = peak - before
    assert grew < 32, f"the sidecar grew {grew:.1f} MiB for a caller that does not read"
    print(f"RSS +{grew:.1f} MiB at most; {served} calls served to another caller in 1.5 s")
