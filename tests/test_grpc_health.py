"""gRPC health (grpc_health, upstream_health_check): health calls pass through to the app by
default; with `grpc_health: sidecar` the sidecar answers Check and Watch itself from the
route's readiness, for any caller whose certificate the CA signed, and a Watch hears each
change live; `upstream_health_check: grpc` makes readiness follow the app's own health
service. Both data planes, grpcio and grpc-go clients."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.conftest import (
    ChildProcess,
    Pki,
    SidecarFactory,
    SidecarProcess,
    assert_config_error,
    wait_until,
)
from tests.probe import Probe
from tests.test_go import crosslang  # noqa: F401  (the Go program, a fixture)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNARY = "/probe.Probe/Unary"
PLANES = ["splice", "grpc"]


class HealthApp:
    """An app that has the health service (grpcio-health-checking's), its status set by the
    test: for upstream_health_check: grpc."""

    def __init__(self) -> None:
        self.servicer = health.HealthServicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def set(self, status: int) -> None:
        self.servicer.set("", status)

    def stop(self) -> None:
        self._server.stop(None)


@pytest.fixture
def health_app() -> Iterator[HealthApp]:
    app = HealthApp()
    try:
        yield app
    finally:
        app.stop()


def _check(channel: grpc.Channel, service: str = "") -> int | grpc.StatusCode:
    """The status a Check answers, or the gRPC code it failed with."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    except grpc.RpcError as error:
        return error.code()


def _until(statuses: Iterator[health_pb2.HealthCheckResponse], wanted: int) -> None:
    """Read a Watch until it says `wanted` (it says the status at once, then each change)."""
    for reply in statuses:
        if reply.status == wanted:
            return
    raise AssertionError(f"the Watch ended before it said {wanted}")


def _unary(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        channel.unary_unary(UNARY)(b"x", timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("data_plane", PLANES)
def test_health_calls_go_to_the_app_by_default(
    sidecars: SidecarFactory, pki: Pki, health_app: HealthApp, data_plane: str
) -> None:
    sidecar = sidecars.serving(health_app.port, "--allow-cn", "alice", "--data-plane", data_plane)
    health_app.set(NOT_SERVING)  # what only the app can say
    with sidecar.channel(pki, "alice") as alice:
        assert _check(alice) == NOT_SERVING
    with sidecar.channel(pki, "mallory") as mallory:  # and the rules apply to it
        assert _check(mallory) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("data_plane", PLANES)
def test_the_sidecar_answers_health_for_any_verified_caller_from_readiness(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, data_plane: str
) -> None:
    """The probe app has no health service. Callers the rules deny may still ask about
    health (and nothing else); the answer follows the app going away and coming back."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--grpc-health", "sidecar",
                               "--data-plane", data_plane)  # fmt: skip
    with sidecar.channel(pki, "alice") as alice, sidecar.channel(pki, "mallory") as mallory:
        wait_until(lambda: _check(alice) == SERVING)
        assert _check(mallory) == SERVING
        assert _check(mallory, "any.Service") == SERVING  # the app as a whole, whatever named
        assert _unary(mallory) == grpc.StatusCode.PERMISSION_DENIED
        assert _unary(alice) == grpc.StatusCode.OK
        port = probe.port
        probe.stop()
        wait_until(lambda: _check(alice) == NOT_SERVING)
        # (A connection that finds the app gone says so at once; the others once the
        # route's own check of the app has failed for a few seconds.)
        wait_until(lambda: _check(mallory) == NOT_SERVING)
        probe.start(port)
        wait_until(lambda: _check(alice) == SERVING)
        wait_until(lambda: _check(mallory) == SERVING)
    sidecar.wait_for(r"/grpc\.health\.v1\.Health/Check peer='CN=mallory' .*code=OK")
    assert not [call for call in probe.calls if "Health" in call.method]  # never relayed


@pytest.mark.parametrize("data_plane", PLANES)
def test_a_revoked_caller_gets_no_health_answer(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, data_plane: str
) -> None:
    serial = x509.load_pem_x509_certificate(pki.cert("mallory").read_bytes()).serial_number
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--grpc-health", "sidecar",
                               "--deny-serials", format(serial, "x"),
                               "--data-plane", data_plane)  # fmt: skip
    with sidecar.channel(pki, "alice") as alice:
        wait_until(lambda: _check(alice) == SERVING)
    with sidecar.channel(pki, "mallory") as mallory:
        assert _check(mallory) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("data_plane", PLANES)
def test_a_watch_hears_each_change_of_the_apps_health_live(
    sidecars: SidecarFactory, pki: Pki, health_app: HealthApp, data_plane: str
) -> None:
    """upstream_health_check: grpc makes readiness the app's own health; a Watch open on
    the sidecar hears it change both ways on the same stream, /readyz says why, and the
    Watch ends at once when the sidecar shuts down (the drain does not wait for it)."""
    sidecar = sidecars.serving(health_app.port, "--allow-cn", "alice", "--grpc-health",
                               "sidecar", "--upstream-health-check", "grpc", "--admin",
                               "127.0.0.1:0", "--drain-grace", "60",
                               "--data-plane", data_plane)  # fmt: skip
    admin = int(sidecar.wait_for(r"admin: .* served at 127\.0\.0\.1:(\d+)").group(1))
    # (A caller the rules admit to nothing gets the status, then UNAVAILABLE: see
    # test_grpc_go_hears_not_serving_from_a_refused_connection.)
    with sidecar.channel(pki, "alice") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=60
        )
        _until(watch, SERVING)
        health_app.set(NOT_SERVING)
        _until(watch, NOT_SERVING)
        status, body = _readyz(admin)
        assert status == 503 and "its health Check answered NOT_SERVING" in body, body
        health_app.set(SERVING)
        _until(watch, SERVING)
        sidecar.signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ended:
            _until(watch, SERVING + 100)  # read on to its end
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "watch again" in ended.value.details()
    assert sidecar.wait_exit(timeout=30) == 0  # well within the drain grace of 60 s


def test_a_watch_on_the_splice_ends_with_the_apps_connection_and_a_new_one_hears_why(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """A Watch lives on a connection spliced to the app: when the app goes, the Watch
    ends (UNAVAILABLE: the app's GOAWAY, or the sidecar's when the connection is lost,
    after NOT_SERVING); a Check made anew hears NOT_SERVING, and a Watch SERVING once the
    app is back. (An app's GOAWAY may be a routine one, its connection's age: the
    sidecar does not take it for NOT_SERVING.)"""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--grpc-health", "sidecar")
    with sidecar.channel(pki, "alice") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        _until(watch, SERVING)
        port = probe.port
        probe.stop()
        heard = []
        with pytest.raises(grpc.RpcError) as ended:
            heard += [reply.status for reply in watch]
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert set(heard) <= {NOT_SERVING}, heard
        wait_until(lambda: _check(channel) == NOT_SERVING)
        # A Watch made while the app is away ends with the reason, and no status (a
        # client backs off before it watches again: see the Go test of refused connections).
        assert _first_status(stub) == grpc.StatusCode.UNAVAILABLE
        probe.start(port)
        wait_until(lambda: _first_status(stub) == SERVING)


def _first_status(stub: health_pb2_grpc.HealthStub) -> int | grpc.StatusCode:
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    try:
        return int(next(watch).status)
    except grpc.RpcError as error:
        return error.code()
    finally:
        watch.cancel()


@pytest.mark.parametrize("data_plane", PLANES)
def test_a_connection_holds_a_bounded_number_of_watches(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, data_plane: str
) -> None:
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--grpc-health", "sidecar",
                               "--data-plane", data_plane)  # fmt: skip
    with sidecar.channel(pki, "alice") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(16)]
        for watch in watches:
            next(watch)  # each is open, and answered
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=60))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for watch in watches:
            watch.cancel()
        # Cancelled, they are let go: the connection takes new ones.
        wait_until(lambda: _watch_opens(stub))
        assert _unary(channel) == grpc.StatusCode.OK


def _watch_opens(stub: health_pb2_grpc.HealthStub) -> bool:
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    try:
        next(watch)
        return True
    except grpc.RpcError:
        return False
    finally:
        watch.cancel()


def test_health_answers_and_relayed_calls_share_a_connection(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """The splice's own answers take the caller's connection window; the app is never
    told of it (window_debt), and many of them beside relayed calls go through."""
    # 4,000 checks as fast as a client can send them: each is charged as a control frame,
    # with the client's window updates and PINGs, which a fast machine took past the
    # default 1000/s budget (a GOAWAY, ENHANCE_YOUR_CALM). The budget is not this test's
    # subject (tests/hostile/test_allowed.py's is): it is raised here.
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--grpc-health", "sidecar",
        "--control-frame-rate", "100000",
    )  # fmt: skip
    big = b"x" * (256 * 1024)
    with sidecar.channel(pki, "alice") as channel:
        wait_until(lambda: _check(channel) == SERVING)
        echo = channel.unary_unary(UNARY)
        for _ in range(20):
            assert all(_check(channel) == SERVING for _ in range(200))  # 9.8 KB of window
            assert echo(big, timeout=10) == big


def test_grpc_go_checks_and_watches_through_the_splice(
    crosslang: Path,  # noqa: F811  (the fixture imported above)
    sidecars: SidecarFactory,
    pki: Pki,
    health_app: HealthApp,
) -> None:
    sidecar = sidecars.serving(health_app.port, "--allow-cn", "alice", "--grpc-health",
                               "sidecar", "--upstream-health-check", "grpc")  # fmt: skip
    client = _go_health(crosslang, pki, sidecar, "alice", "-watch", "2")
    try:
        client.wait_for(r"check SERVING")  # the first check of the app is done by then:
        client.wait_for(r"watch SERVING")  # (a Check that came before it would say NOT_)
        health_app.set(NOT_SERVING)
        client.wait_for(r"watch NOT_SERVING")
    finally:
        client.stop()


def test_grpc_go_health_calls_reach_the_apps_own_service_by_default(
    crosslang: Path,  # noqa: F811
    sidecars: SidecarFactory,
    pki: Pki,
    health_app: HealthApp,
) -> None:
    sidecar = sidecars.serving(health_app.port, "--allow-cn", "alice")
    health_app.set(NOT_SERVING)  # what only the app can say
    client = _go_health(crosslang, pki, sidecar, "alice", "-watch", "2", ready=False)
    try:
        client.wait_for(r"check NOT_SERVING")
        client.wait_for(r"watch NOT_SERVING")
        health_app.set(SERVING)
        client.wait_for(r"watch SERVING")
    finally:
        client.stop()


def _go_health(
    program: Path, pki: Pki, sidecar: SidecarProcess, client: str, *extra: str, ready: bool = True
) -> ChildProcess:
    """The Go health client, once the sidecar says SERVING (unless `ready` is False)."""
    if ready:
        wait_until(lambda: _ready_for(pki, sidecar))
    return ChildProcess(
        [str(program), "health", "-target", f"127.0.0.1:{sidecar.port}", "-server-name",
         "localhost", "-ca", str(pki.dir / "ca.pem"), "-cert", str(pki.cert(client)),
         "-key", str(pki.key(client)), *extra]
    )  # fmt: skip


def _ready_for(pki: Pki, sidecar: SidecarProcess) -> bool:
    with sidecar.channel(pki, "alice") as channel:
        return _check(channel) == SERVING


def test_grpc_go_watches_on_refused_connections_without_a_spin(
    crosslang: Path,  # noqa: F811
    sidecars: SidecarFactory,
    pki: Pki,
    probe: Probe,
) -> None:
    """A caller the rules admit to nothing hears the status, on a Watch kept open until its
    connection ends (denied_lifetime); with the app down, a Watch ends UNAVAILABLE with the
    reason and no status, so that a client backs off before it watches again (one that
    heard a status would start again at once: a spin of new connections)."""
    sidecar = sidecars.serving(probe.port, "--allow-cn", "alice", "--grpc-health", "sidecar",
                               "--denied-lifetime", "1")  # fmt: skip
    client = _go_health(crosslang, pki, sidecar, "mallory", "-watch", "2")
    try:
        client.wait_for(r"check SERVING")
        client.wait_for(r"watch SERVING")
        client.wait_for(r"watch end Unavailable")  # the connection's end, a second later
    finally:
        client.stop()
    probe.stop()
    with sidecar.channel(pki, "alice") as alice:
        wait_until(lambda: _check(alice) == NOT_SERVING)
    client = _go_health(crosslang, pki, sidecar, "alice", "-watch", "1", ready=False)
    try:
        client.wait_for(r"check NOT_SERVING")
        client.wait_for(r"watch end Unavailable upstream 127\.0\.0\.1:\d+ unavailable")
        assert "watch NOT_SERVING" not in client.output
    finally:
        client.stop()


def test_grpc_health_and_its_check_are_ingress_settings(sidecars: SidecarFactory) -> None:
    for flag, value in (("--grpc-health", "sidecar"), ("--upstream-health-check", "grpc")):
        args = ["--mode", "egress", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
                flag, value, *sidecars.tls_args()]  # fmt: skip
        assert_config_error(sidecars, args, f"{flag} applies to ingress routes only")
    args = ["--upstream", "127.0.0.1:1", "--allow-cn", "a", "--grpc-health", "maybe",
            *sidecars.tls_args()]  # fmt: skip
    assert_config_error(sidecars, args, "--grpc-health")


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
