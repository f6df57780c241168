"""The rolling restart of the README, under load: a second sidecar starts on the same port
(SO_REUSEPORT), the first is sent SIGTERM and drains, and no call fails.

It runs in a network namespace of its own, so that net.ipv4.tcp_migrate_req (the sysctl the
recipe asks for: connections queued on the listener that closes move to the one that
stays) is set there and nowhere else. Everything (the app, both sidecars, the load) runs
inside it, on its loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, ChildProcess, Pki, SidecarProcess, install_debian_packages
from tests.test_netns import ip

HEALTH = "/grpc.health.v1.Health/Check"


@pytest.fixture
def namespace() -> Iterator[list[str]]:
    """A network namespace with its loopback up and queued connections migrating between
    listeners of one port; the command prefix that runs a program inside it."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root, and this test runs as an ordinary user")
    install_debian_packages(["iproute2", "procps"], ["ip", "sysctl"])
    name = f"sc{uuid.uuid4().hex[:6]}-rr"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        prefix = ["ip", "netns", "exec", name]
        subprocess.run([*prefix, "sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"],
                       check=True, capture_output=True)  # fmt: skip
        yield prefix
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_a_second_sidecar_takes_over_the_port_without_a_failed_call(
    namespace: list[str], pki: Pki, tmp_path: Path
) -> None:
    """The splice plane only: on data_plane grpc, grpc core's shutdown cancels the calls it
    has accepted but not yet handed to the relay, and under steady load some always are
    (the README says so; test_startup checks that its port is shared all the same)."""
    app = ChildProcess([*namespace, sys.executable, "-m", "demo.app", "--listen",
                        "127.0.0.1:50051"])  # fmt: skip
    args = [
        "--listen", "127.0.0.1:8443", "--upstream", "127.0.0.1:50051", "--allow-cn", "alice",
        "--cert", str(pki.cert("server")), "--key", str(pki.key("server")),
        "--ca", str(pki.dir / "ca.pem"), "--drain-grace", "20",
    ]  # fmt: skip
    first = second = None
    client = tmp_path / "client"
    client.mkdir()
    shutil.copy(pki.dir / "ca.pem", client / "ca.pem")
    shutil.copy(pki.cert("alice"), client / "client.pem")
    shutil.copy(pki.key("alice"), client / "client.key")
    load = None
    try:
        app.wait_for("demo app: plain gRPC")
        first = SidecarProcess(args, prefix=namespace)
        first.wait_ready()
        load = subprocess.Popen(
            [*namespace, sys.executable, "-m", "tests.load", "--target", "127.0.0.1:8443",
             "--tls-dir", str(client), "--method", HEALTH],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert load.stdout is not None and load.stdout.readline().strip() == "started"
        first.wait_for_count(HEALTH, 300)  # the load is running through the first

        second = SidecarProcess(args, prefix=namespace)
        second.wait_ready()  # the same port: no "address in use"
        second.wait_for_count(HEALTH, 100)  # new connections reach both
        first.signal(signal.SIGTERM)
        assert first.wait_exit() == 0
        served = sum(HEALTH in line for line in second.lines)
        second.wait_for_count(HEALTH, served + 300)  # the second carries the load alone

        out, _ = load.communicate("stop\n", timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        assert result["failed"] == 0, result
        assert result["ok"] > 700 and result["connections"] > 40, result
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait(10)
        for process in (first, second, app):
            if process is not None:
                process.stop()
