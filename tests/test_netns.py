"""The compose topology for real, across a network: hosts made of Linux network namespaces.

    host "app":    demo app on 127.0.0.1:50051 + ingress sidecar on :8443 (allows CN=web)
    host "web":    egress sidecar on 127.0.0.1:50052 -> app:8443, the demo client
    host "rogue":  egress sidecar with a valid certificate that is not on the allowlist

joined by veth pairs to a bridge in a fourth namespace, names resolved through
/etc/netns/<ns>/hosts as Docker's DNS would. Only addresses inside these namespaces are used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, SidecarProcess, install_debian_packages, run_demo_client

SUBNET = "10.203.0"
HOSTS = {"app": 1, "web": 2, "rogue": 3}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Network:
    """Namespaces for each host and a bridge joining them; removed on close, whatever happened."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.names = {host: f"sc{tag}-{host}" for host in HOSTS}
        self.bridge_ns = f"sc{tag}-lan"
        self._hosts_dirs: list[Path] = []
        self.processes: list[subprocess.Popen[str] | SidecarProcess] = []

    def build(self) -> None:
        ip("netns", "add", self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        hosts_file = "".join(f"{SUBNET}.{n} {host}\n" for host, n in HOSTS.items())
        for index, (host, ns) in enumerate(self.names.items()):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            outside = f"v{index}{ns[2:8]}"
            ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", outside,
               "netns", self.bridge_ns)  # fmt: skip
            ip("-n", self.bridge_ns, "link", "set", outside, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{SUBNET}.{HOSTS[host]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{hosts_file}")
            self._hosts_dirs.append(etc)

    def run(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[host]]

    def close(self) -> None:
        for process in self.processes:
            if isinstance(process, SidecarProcess):
                process.stop()
            else:
                process.kill()
                process.wait(10)
                if process.stdout is not None:
                    process.stdout.close()
        for ns in [*self.names.values(), self.bridge_ns]:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        for etc in self._hosts_dirs:
            shutil.rmtree(etc, ignore_errors=True)


@pytest.fixture
def network() -> Iterator[Network]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root, and this test runs as an ordinary user")
    install_debian_packages(["iproute2"], ["ip"])
    net = Network()
    try:
        net.build()
        yield net
    finally:
        net.close()


def certs(directory: Path) -> None:
    def sidecar_certs(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "sidecar", "certs", *args], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip

    sidecar_certs("init-ca", "--out", str(directory / "ca"))
    sidecar_certs("issue", "--ca", str(directory / "ca"), "--cn", "app", "--server",
                  "--out", str(directory))  # fmt: skip
    for client in ("web", "rogue"):
        sidecar_certs("issue", "--ca", str(directory / "ca"), "--cn", client, "--client",
                      "--out", str(directory))  # fmt: skip


def tls(directory: Path, name: str) -> list[str]:
    return ["--cert", str(directory / f"{name}.pem"), "--key", str(directory / f"{name}.key"),
            "--ca", str(directory / "ca" / "ca.pem")]  # fmt: skip


def client(net: Network, host: str, target: str, commands: str) -> str:
    return run_demo_client(target, commands, prefix=net.run(host))


def test_calls_cross_hosts_only_over_mtls_to_the_dns_name(network: Network, tmp_path: Path) -> None:
    certs(tmp_path)
    app = subprocess.Popen(
        [*network.run("app"), sys.executable, "-m", "demo.app", "--listen", "127.0.0.1:50051"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    network.processes.append(app)
    assert app.stdout is not None and "127.0.0.1:50051" in app.stdout.readline()

    ingress = SidecarProcess(
        ["--listen", "0.0.0.0:8443", "--upstream", "127.0.0.1:50051", *tls(tmp_path, "app"),
         "--allow-cn", "web"],
        prefix=network.run("app"),
    )  # fmt: skip
    network.processes.append(ingress)
    ingress.wait_ready()
    egresses = {}
    for host in ("web", "rogue"):
        # No --server-name: the remote is checked against the upstream's DNS name, "app".
        egress = SidecarProcess(
            ["--mode", "egress", "--listen", "127.0.0.1:50052", "--upstream", "app:8443",
             *tls(tmp_path, host)],
            prefix=network.run(host),
        )  # fmt: skip
        network.processes.append(egress)
        egress.wait_ready()
        egress.wait_for("expecting server name 'app'")
        egresses[host] = egress

    session = client(network, "web", "127.0.0.1:50052", "put colour blue\nget colour\n")
    assert "ok (previous: none)" in session and "\nblue\n" in session
    ingress.wait_for(r"/kv.KV/Get peer='CN=web.* remote=ipv4:10\.203\.0\.2:\d+ code=OK")

    refused = client(network, "rogue", "127.0.0.1:50052", "get colour\n")
    assert "error: PERMISSION_DENIED: peer CN=rogue" in refused
    assert "not allowed to call /kv.KV/Get" in refused

    # The app's plaintext port is not reachable from another host: it is on loopback.
    probe = subprocess.run(
        [*network.run("web"), sys.executable, "-c",
         "import socket; socket.create_connection(('app', 50051), 3)"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert probe.returncode != 0 and "ConnectionRefusedError" in probe.stderr, probe.stderr
    # ...while the sidecar's port is, and speaks only TLS: a plaintext gRPC client gets nowhere.
    plaintext = client(network, "web", "app:8443", "get colour\n")
    assert "error: UNAVAILABLE" in plaintext, plaintext
