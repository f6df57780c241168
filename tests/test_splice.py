"""The spliced data plane at the HTTP/2 level: one way in, bounded buffers, broken callers.

The relay suite (test_relay.py) checks gRPC's semantics through the sidecar;
these tests speak HTTP/2 directly (h2 over a TLS socket) to see what gRPC
clients hide: GOAWAY on drain, what a caller breaking HTTP/2 gets, and that a
caller who stops reading holds the upstream back instead of filling the
sidecar's memory.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"
SERVER_STREAM = "/probe.Probe/ServerStream"
MIB = 1024 * 1024


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


@contextmanager
def tls_socket(port: int, pki: Pki, client: str = "alice") -> Iterator[ssl.SSLSocket]:
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.pem"))
    context.load_cert_chain(pki.cert(client), pki.key(client))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        yield tls


class H2Caller:
    """A gRPC caller written with h2, so that every frame is visible."""

    def __init__(self, sock: ssl.SSLSocket, window: int = 65_535) -> None:
        self.sock = sock
        self.connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.connection.initiate_connection()
        if window > 65_535:
            self.connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            self.connection.increment_flow_control_window(window - 65_535)
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.connection.data_to_send())

    def call(self, method: str, message: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> int:
        stream_id = self.connection.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", method),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        self.connection.send_headers(stream_id, headers)
        payload = grpc_frame(message)
        for offset in range(0, len(payload), 16_384):  # the smallest frame size a peer allows
            chunk = payload[offset : offset + 16_384]
            self.connection.send_data(stream_id, chunk, end_stream=offset + 16_384 >= len(payload))
        self.flush()
        return stream_id

    def events(self) -> list[h2.events.Event]:
        data = self.sock.recv(MIB)
        if not data:
            raise ConnectionError("the sidecar closed the connection")
        events = self.connection.receive_data(data)
        self.flush()
        return events

    def until(self, kind: type[h2.events.Event]) -> h2.events.Event:
        while True:
            for event in self.events():
                if isinstance(event, kind):
                    return event


def listening_ports(pid: int) -> set[int]:
    """The TCP ports the process listens on (any address, v4 or v6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_listener_is_the_only_way_in(sidecar_alice: SidecarProcess) -> None:
    """No internal port: nothing a local process could reach around mTLS."""
    assert listening_ports(sidecar_alice.proc.pid) == {sidecar_alice.port}


@pytest.fixture
def sidecar_alice(sidecars: SidecarFactory, probe: Probe) -> SidecarProcess:
    return sidecars.serving(probe.port, "--allow-cn", "alice")


def test_a_caller_breaking_http2_loses_only_its_own_connection(
    sidecar_alice: SidecarProcess, pki: Pki
) -> None:
    with tls_socket(sidecar_alice.port, pki) as broken:
        broken.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not the HTTP/2 preface
        received = b""
        while chunk := broken.recv(65536):  # until the sidecar closes the connection
            received += chunk
        # Its last word, when the connection had begun: GOAWAY PROTOCOL_ERROR with the reason.
        goaway = received.find(b"the connection does not start with the HTTP/2 preface")
        assert goaway == -1 or received[goaway - 4 : goaway] == (1).to_bytes(4, "big")
    sidecar_alice.wait_for("broke HTTP/2: the connection does not start with the HTTP/2 preface")
    with sidecar_alice.channel(pki) as channel:
        assert channel.unary_unary(UNARY)(b"still serving", timeout=10) == b"still serving"


def test_response_and_trailers_cross_unchanged_at_the_frame_level(
    sidecar_alice: SidecarProcess, pki: Pki
) -> None:
    with tls_socket(sidecar_alice.port, pki) as sock:
        caller = H2Caller(sock)
        stream_id = caller.call(UNARY, b"raw", (("x-probe-status", "5"), ("x-probe-details", "no")))
        headers: list[tuple[bytes, bytes]] = []
        while True:
            events = caller.events()
            for event in events:
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers += event.headers
            if any(isinstance(e, h2.events.StreamEnded) for e in events):
                break
    assert (b"grpc-status", b"5") in headers
    assert (b"grpc-message", b"no") in headers
    assert stream_id == 1


def test_pings_are_answered_by_the_sidecar(sidecar_alice: SidecarProcess, pki: Pki) -> None:
    with tls_socket(sidecar_alice.port, pki) as sock:
        caller = H2Caller(sock)
        caller.connection.ping(b"\x00sidecar")
        caller.flush()
        ack = caller.until(h2.events.PingAckReceived)
        assert ack.ping_data == b"\x00sidecar"


def test_a_caller_that_stops_reading_holds_the_upstream_back(
    sidecar_alice: SidecarProcess, pki: Pki, probe: Probe
) -> None:
    """The caller grants a 1 GiB window and reads nothing: the upstream may send it
    all, and only the sidecar's backpressure (it stops reading the upstream while
    the caller's socket is full) keeps the 120 MiB stream out of the sidecar's memory."""
    size, count = 60 * 1024, 2048  # a request fits the initial window; the reply echoes it
    status = Path(f"/proc/{sidecar_alice.proc.pid}/status")

    def peak_rss_mib() -> float:
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    before = peak_rss_mib()
    with tls_socket(sidecar_alice.port, pki) as sock:
        caller = H2Caller(sock, window=1 << 30)
        caller.call(SERVER_STREAM, b"m" * size, (("x-probe-count", str(count)),))
        (seen,) = probe.wait_for_calls(1)
        # Held back: the stream cannot finish while the caller reads nothing...
        assert not seen.ended.wait(5), "the upstream sent everything: nothing held it back"
        # ...and it all arrives once the caller reads.
        received = 0
        while True:
            events = caller.events()
            for event in events:
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)
                    caller.connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            caller.flush()
            if any(isinstance(e, h2.events.StreamEnded) for e in events):
                break
    assert received == sum(5 + size + len(str(index)) for index in range(count))
    grown = peak_rss_mib() - before
    assert grown < 48, f"the sidecar's peak memory grew by {grown:.0f} MiB for 120 MiB relayed"


def test_drain_sends_goaway_and_lets_the_call_in_flight_finish(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    process = sidecars.serving(probe.port, "--allow-cn", "alice", "--drain-grace", "30")
    gate = probe.gate("drain-h2")
    with tls_socket(process.port, pki) as sock:
        caller = H2Caller(sock)
        caller.call(UNARY, b"in flight", (("x-probe-gate", "drain-h2"),))
        probe.wait_for_calls(1)
        process.signal(signal.SIGTERM)
        # Read as bytes from here: h2 takes a GOAWAY as the end of everything, and the
        # drain's PING that follows it as a protocol error.
        # NO_ERROR, and 2^31-1: finish what was started, nothing is refused yet.
        first_goaway = bytes.fromhex("000008070000000000" + "7fffffff00000000")
        rest = b""
        while first_goaway not in rest:
            chunk = sock.recv(MIB)
            assert chunk, "the connection closed before the drain's GOAWAY"
            rest += chunk
        gate.set()
        while chunk := sock.recv(MIB):
            rest += chunk
        assert grpc_frame(b"in flight") in rest, "the reply must arrive before the close"
        # The last word (once the drain's PING is answered, or after a second without an
        # answer, as here) names the last stream relayed (1): anything later was not processed.
        final_goaway = bytes.fromhex("0000080700000000000000000100000000")
        assert rest.endswith(final_goaway)
    assert process.wait_exit() == 0


def test_the_grpc_data_plane_still_relays(sidecars: SidecarFactory, pki: Pki, probe: Probe) -> None:
    process = sidecars.serving(probe.port, "--allow-cn", "alice", "--data-plane", "grpc")
    with process.channel(pki) as channel:
        assert channel.unary_unary(UNARY)(b"per call", timeout=10) == b"per call"
    with process.channel(pki, client="mallory") as channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(UNARY)(b"x", timeout=10)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


class NotGrpcUpstream:
    """An HTTP/2 server that is not gRPC: 404 with a text body on one path, a bare 503
    (headers only) on every other. No grpc-status anywhere."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        connection.initiate_connection()
        # The sidecar may end the connection with a reset at its exit: not this test's concern.
        with sock, suppress(ConnectionError):
            while data := sock.recv(MIB):
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        stream = event.stream_id
                        if dict(event.headers)[b":path"] == b"/app.Missing/Call":
                            connection.send_headers(
                                stream, [(":status", "404"), ("content-type", "text/plain")]
                            )
                            connection.send_data(stream, b"not found", end_stream=True)
                        else:
                            connection.send_headers(stream, [(":status", "503")], end_stream=True)
                sock.sendall(connection.data_to_send())

    def close(self) -> None:
        self.listener.close()


def test_a_response_without_grpc_status_is_logged_with_the_status_clients_read(
    sidecars: SidecarFactory, pki: Pki
) -> None:
    """gRPC's HTTP-to-status mapping: 404 is UNIMPLEMENTED, 503 UNAVAILABLE; and a response
    that ends with DATA instead of trailers still ends its call."""
    upstream = NotGrpcUpstream()
    try:
        process = sidecars.serving(upstream.port, "--allow-cn", "alice", "--drain-grace", "30")
        with tls_socket(process.port, pki) as sock:
            caller = H2Caller(sock)
            for path, status in (("/app.Missing/Call", b"404"), ("/app.Busy/Call", b"503")):
                caller.call(path, b"x")
                events: list[h2.events.Event] = []
                while not any(isinstance(event, h2.events.StreamEnded) for event in events):
                    events += caller.events()
                (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
                assert dict(response.headers)[b":status"] == status
            process.wait_for(r"sidecar.access: /app\.Missing/Call .* code=UNIMPLEMENTED")
            process.wait_for(r"sidecar.access: /app\.Busy/Call .* code=UNAVAILABLE")
            # No call is left in flight, so the drain's first word is its last: a GOAWAY
            # naming stream 3, then the close.
            process.signal(signal.SIGTERM)
            rest = b""
            while chunk := sock.recv(MIB):
                rest += chunk
            assert rest.endswith(bytes.fromhex("0000080700000000000000000300000000"))
        assert process.wait_exit() == 0
    finally:
        upstream.close()


def test_a_denied_call_reset_in_the_same_read_leaves_the_connection_answering(
    sidecar_alice: SidecarProcess, pki: Pki
) -> None:
    with tls_socket(sidecar_alice.port, pki, client="mallory") as sock:
        caller = H2Caller(sock)
        first = caller.connection.get_next_available_stream_id()
        caller.connection.send_headers(
            first, [(":method", "POST"), (":scheme", "https"), (":path", UNARY),
                    (":authority", "localhost"), ("content-type", "application/grpc")],
        )  # fmt: skip
        caller.connection.reset_stream(first, 8)  # CANCEL, in the same write
        caller.flush()
        second = caller.call(UNARY, b"x")
        headers: list[tuple[bytes, bytes]] = []
        while not headers:
            for event in caller.events():
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == second:
                    headers = event.headers
        assert (b"grpc-status", b"7") in headers  # PERMISSION_DENIED
    sidecar_alice.wait_for(
        r"sidecar.access: /probe.Probe/Unary peer='CN=mallory' .* code=CANCELLED"
    )
    assert not any("Traceback" in line for line in sidecar_alice.lines)


def socket_option_of(pid: int, fd: int, level: int, option: int) -> int:
    """A socket option of another process's socket (pidfd_getfd, Linux 5.6+; as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd
        if copy < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        with socket.socket(fileno=copy) as sock:
            return sock.getsockopt(level, option)
    finally:
        os.close(pidfd)


def test_both_connections_of_a_splice_have_tcp_keepalive(
    sidecar_alice: SidecarProcess, pki: Pki, probe: Probe
) -> None:
    """The sidecar answers PINGs itself, so a peer's keepalive never crosses it: TCP's
    must find a peer that vanished, on the caller's side and on the app's."""
    with tls_socket(sidecar_alice.port, pki) as sock:
        caller = H2Caller(sock)
        caller.call(UNARY, b"x")
        caller.until(h2.events.StreamEnded)
        for where, peer in (("src", sidecar_alice.port), ("dst", probe.port)):
            # The sidecar's own sockets: it accepted on the first port, connected to the second.
            shown = subprocess.run(
                ["ss", "-tnpH", "state", "established", where, f"127.0.0.1:{peer}"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            fds = [
                int(found.group(1))
                for line in shown.splitlines()
                if (found := re.search(rf"pid={sidecar_alice.proc.pid},fd=(\d+)", line))
            ]
            assert fds, f"no connection of the sidecar with {where} port {peer}: {shown!r}"
            for fd in fds:
                pid = sidecar_alice.proc.pid
                assert socket_option_of(pid, fd, socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                assert socket_option_of(pid, fd, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
