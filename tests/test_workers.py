"""`workers: N`: N processes share each route's listeners and act as one sidecar.

The load spreads (access lines name their worker), the admin listener adds the
workers up, a dead worker is replaced, SIGTERM drains every worker without losing a
call, SIGHUP reloads every worker, and workers whose supervisor is gone drain and exit.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import threading
from pathlib import Path

import grpc
import hpack
import pytest

from sidecar.h2.frames import END_HEADERS, END_STREAM, HEADERS
from tests.conftest import Pki, SidecarFactory, SidecarProcess, assert_config_error, wait_until
from tests.hostile.peers import RawPeer
from tests.probe import Probe
from tests.test_admin import _admin_port, _get, _samples
from tests.test_lifecycle import wait_until_refused

UNARY = "/probe.Probe/Unary"
ACCESS_LINE = re.compile(
    r"^\S+ \S+ INFO sidecar\.access: /probe\.Probe/Unary worker=(?P<worker>\d) peer='CN=alice' "
    r"remote=ipv4:127\.0\.0\.1:\d+ code=OK duration_ms=[\d.]+ bytes_in=\d+ bytes_out=\d+$"
)


def _workers(sidecars: SidecarFactory, probe: Probe, *args: str) -> tuple[SidecarProcess, int]:
    """A sidecar with two workers and an admin listener, both workers ready."""
    process = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--workers", "2", "--admin", "127.0.0.1:0", *args
    )
    process.wait_for("workers: 2 serving")
    return process, _admin_port(process)


def _workers_from_file(sidecars: SidecarFactory, config: Path, text: str) -> SidecarProcess:
    """A sidecar with two workers, configured by `config` (written with `text`), serving."""
    config.write_text(text)
    process = sidecars.start("--config", str(config), "--workers", "2")
    process.wait_ready()
    process.wait_for("workers: 2 serving")
    return process


def _worker_pids(admin: int) -> list[int]:
    _, body = _get(admin, "/status")
    return [worker["pid"] for worker in json.loads(body)["workers"]]


def _calls_on_new_connections(process: SidecarProcess, pki: Pki, connections: int) -> None:
    """One call on each of `connections` connections, opened at once."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with process.channel(pki) as channel:
                assert channel.unary_unary(UNARY)(b"spread", timeout=20) == b"spread"
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_workers_share_the_load_and_the_admin_adds_them_up(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    process, admin = _workers(sidecars, probe)
    _calls_on_new_connections(process, pki, 40)
    process.wait_for_count("sidecar.access", 40)
    access = [line for line in process.lines if "sidecar.access" in line]
    # One stream of whole lines: none cut into, none run together.
    assert all(ACCESS_LINE.match(line) for line in access), access
    served_by = {ACCESS_LINE.match(line).group("worker") for line in access}  # type: ignore[union-attr]
    assert served_by == {"0", "1"}, "both workers must have served calls"

    calls = _samples(admin, "sidecar_calls_total")
    assert sum(calls.values()) == 40, calls
    assert sum(_samples(admin, "sidecar_connections_accepted_total").values()) == 40
    assert _samples(admin, "sidecar_workers") == {(): 2.0}
    status, body = _get(admin, "/readyz")
    assert status == 200, body
    status, body = _get(admin, "/status")
    workers = json.loads(body)["workers"]
    assert [worker["worker"] for worker in workers] == [0, 1]
    assert all(worker["ready"] and worker["restarts"] == 0 for worker in workers)
    assert json.loads(body)["routes"][0]["upstream"].endswith(str(probe.port))


def test_a_killed_worker_is_replaced_and_the_others_serve_meanwhile(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    process, admin = _workers(sidecars, probe)
    _calls_on_new_connections(process, pki, 20)
    process.wait_for_count("sidecar.access", 20)
    assert sum(_samples(admin, "sidecar_calls_total").values()) == 20
    victim = _worker_pids(admin)[1]
    os.kill(victim, signal.SIGKILL)
    process.wait_for(rf"worker 1 \(pid {victim}\) was killed by SIGKILL after [\d.]+s")
    _calls_on_new_connections(process, pki, 4)  # worker 0 serves while 1 is replaced
    process.wait_for(r"worker 1 started again \(pid \d+\)")
    _, body = _get(admin, "/status")
    replaced = json.loads(body)["workers"][1]
    assert replaced["pid"] != victim and replaced["ready"] and replaced["restarts"] == 1
    assert _samples(admin, "sidecar_worker_restarts_total") == {(): 1.0}
    # The dead worker's counts stay: a counter never goes back.
    assert sum(_samples(admin, "sidecar_calls_total").values()) == 24
    status, _ = _get(admin, "/readyz")
    assert status == 200


@pytest.mark.parametrize("signalled", ["the supervisor", "every process"])
def test_sigterm_drains_every_worker_and_loses_no_call(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, signalled: str
) -> None:
    """`every process`: as systemd stops a service (KillMode=control-group), each worker
    hears SIGTERM twice, from systemd and from its supervisor: still one drain."""
    process, admin = _workers(sidecars, probe, "--drain-grace", "30")
    pids = [process.proc.pid]
    if signalled == "every process":
        pids += _worker_pids(admin)
    gate = probe.gate("drain")
    channels = [process.channel(pki) for _ in range(6)]
    in_flight = [
        channel.unary_unary(UNARY).future(
            b"finish me", timeout=60, metadata=[("x-probe-gate", "drain")]
        )
        for channel in channels
    ]
    probe.wait_for_calls(6)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    process.wait_for("SIGTERM: draining 2 workers")
    wait_until_refused(process.port)
    assert process.proc.poll() is None, "must wait for the in-flight calls"
    gate.set()
    assert [call.result() for call in in_flight] == [b"finish me"] * 6
    for channel in channels:
        channel.close()
    code = process.wait_exit()
    assert code == 0, process.output[-3000:]
    assert process.output.count("sidecar.server: stopped") == 3  # both workers and the supervisor


def test_sighup_reloads_every_worker(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.yaml"
    process = _workers_from_file(
        sidecars, config, f"upstream: 127.0.0.1:{probe.port}\nallow_cn: [alice]\n"
    )
    config.write_text(f"upstream: 127.0.0.1:{probe.port}\nallow_cn: [mallory]\n")
    process.signal(signal.SIGHUP)
    process.wait_for_count("allowlist reloaded: allow allow-cn=mallory", 2)
    # Every worker refuses alice now: on 12 new connections, spread over both.
    for _ in range(12):
        with process.channel(pki) as channel, pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(UNARY)(b"x", timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with process.channel(pki, "mallory") as channel:
        assert channel.unary_unary(UNARY)(b"x", timeout=10) == b"x"


def test_a_worker_started_again_runs_the_configuration_the_others_run(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """An edit not yet reloaded (or refused) does not reach a worker started again."""
    config = tmp_path / "sidecar.yaml"
    process = _workers_from_file(
        sidecars,
        config,
        f"upstream: 127.0.0.1:{probe.port}\nallow_cn: [alice]\nadmin: 127.0.0.1:0\n",
    )
    admin = _admin_port(process)
    config.write_text(f"upstream: 127.0.0.1:{probe.port}\nallow_cn: [mallory]\nbogus: 1\n")
    victim = _worker_pids(admin)[1]
    os.kill(victim, signal.SIGKILL)
    process.wait_for(r"worker 1 started again")
    for _ in range(12):  # both workers still allow alice
        with process.channel(pki) as channel:
            assert channel.unary_unary(UNARY)(b"x", timeout=10) == b"x"
    process.signal(signal.SIGHUP)  # the edit is refused, once, by the supervisor
    process.wait_for("config not reloaded, the running configuration stays: .*bogus")
    assert process.output.count("config not reloaded") == 1


def test_a_stopped_worker_is_killed_once_the_drain_grace_is_over(
    sidecars: SidecarFactory, probe: Probe
) -> None:
    process, admin = _workers(sidecars, probe, "--drain-grace", "1")
    stopped = _worker_pids(admin)[1]
    os.kill(stopped, signal.SIGSTOP)
    process.signal(signal.SIGTERM)
    assert process.wait_exit(timeout=30) == 1  # a worker did not drain
    assert f"worker 1 (pid {stopped}) did not exit: killed" in process.output


def test_a_drain_while_a_worker_is_started_again_is_clean(
    sidecars: SidecarFactory, probe: Probe
) -> None:
    process, admin = _workers(sidecars, probe)
    os.kill(_worker_pids(admin)[1], signal.SIGKILL)
    process.wait_for(r"worker 1 \(pid \d+\) was killed by SIGKILL")
    process.signal(signal.SIGTERM)
    assert process.wait_exit() == 0, process.output


def test_a_worker_that_cannot_be_started_is_tried_again(
    sidecars: SidecarFactory, probe: Probe
) -> None:
    """Out of descriptors when a worker is started again: tried again, not given up."""
    process, admin = _workers(sidecars, probe)
    supervisor = process.proc.pid
    limits = resource.prlimit(supervisor, resource.RLIMIT_NOFILE)
    open_now = len(os.listdir(f"/proc/{supervisor}/fd"))
    resource.prlimit(supervisor, resource.RLIMIT_NOFILE, (open_now, limits[1]))
    try:
        os.kill(_worker_pids(admin)[1], signal.SIGKILL)
        process.wait_for(r"worker 1 did not start \(it could not be started: .*Too many open")
    finally:
        resource.prlimit(supervisor, resource.RLIMIT_NOFILE, limits)
    process.wait_for(r"worker 1 started again", timeout=40)
    status, _ = _get(admin, "/readyz")
    assert status == 200


def test_a_long_json_access_line_crosses_whole(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    """A caller's :path of 15,000 bytes that are not UTF-8 makes a JSON line of ~90 KB."""
    process, _ = _workers(sidecars, probe, "--log-format", "json")
    path = b"/probe.Probe/" + b"\xff" * 15000
    block = hpack.Encoder().encode(
        [(b":method", b"POST"), (b":scheme", b"https"), (b":path", path),
         (b":authority", b"localhost"), (b"content-type", b"application/grpc"),
         (b"te", b"trailers")],
        huffman=False,
    )  # fmt: skip
    peer = RawPeer(process.port, pki)
    try:
        peer.send_frame(HEADERS, END_HEADERS | END_STREAM, 1, block)
        process.wait_for_count('"sidecar.access"', 1)
    finally:
        peer.sock.close()
    access = [line for line in process.lines if '"sidecar.access"' in line]
    for line in access:
        fields = json.loads(line)
        assert fields["method"].startswith("/probe.Probe/") and fields["worker"] in (0, 1)
    assert max(len(line) for line in access) > 65536


def test_workers_drain_and_exit_when_their_supervisor_is_killed(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    process, admin = _workers(sidecars, probe, "--drain-grace", "1")
    _, body = _get(admin, "/status")
    pids = [worker["pid"] for worker in json.loads(body)["workers"]]
    process.proc.kill()
    process.wait_exit()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie is gone too (its parent, the supervisor, is dead; init reaps it).
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"

    wait_until(lambda: all(gone(pid) for pid in pids), timeout=20)
    wait_until_refused(process.port)


def test_a_worker_count_the_grpc_plane_cannot_serve_is_refused(sidecars: SidecarFactory) -> None:
    assert_config_error(
        sidecars,
        ["--upstream", "127.0.0.1:1", *sidecars.tls_args(), "--allow-cn", "a",
         "--workers", "2", "--data-plane", "grpc"],
        "--data-plane grpc serves from one process, and --workers is 2",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", "must be at least 1"), ("65", "at most 64"), ("two", "a whole number or auto")],
)
def test_a_bad_worker_count_is_refused(sidecars: SidecarFactory, value: str, expected: str) -> None:
    assert_config_error(
        sidecars,
        ["--upstream", "127.0.0.1:1", *sidecars.tls_args(), "--allow-cn", "a", "--workers", value],
        "--workers",
        expected,
    )


def test_workers_auto_counts_the_usable_cores(sidecars: SidecarFactory) -> None:
    result = sidecars.run(
        "--check-config", "--upstream", "127.0.0.1:1", *sidecars.tls_args(), "--allow-cn", "a",
        "--workers", "auto",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^workers: {len(os.sched_getaffinity(0))}\b", result.stdout, re.M), (
        result.stdout
    )


@pytest.mark.parametrize("value", ["x", "{}", '{"index": "one"}'])
def test_a_stray_worker_variable_is_a_config_error(sidecars: SidecarFactory, value: str) -> None:
    """_SIDECAR_WORKER is the supervisor's to set: any other value is refused in one line."""
    assert_config_error(
        sidecars,
        ["--upstream", "127.0.0.1:1", *sidecars.tls_args(), "--allow-cn", "a"],
        "_SIDECAR_WORKER is set, but not by a sidecar supervisor",
        env={"_SIDECAR_WORKER": value},
    )
