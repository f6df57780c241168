"""How soon a caller removed from the allowlist is denied: the time from SIGHUP (the config
file already rewritten without it) to its first PERMISSION_DENIED, on a connection it
opened before, for each data plane.

    .venv/bin/python -m bench.reload_latency [--trials 20]

Everything runs on loopback: the demo app as the upstream, one sidecar per data plane.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml

from sidecar import certs

ROOT = Path(__file__).resolve().parent.parent
HEALTH = "/grpc.health.v1.Health/Check"
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write(config: Path, tls: Path, upstream: int, plane: str, allow: list[str]) -> None:
    config.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{upstream}", "data_plane": plane,
        "cert": str(tls / "server.pem"), "key": str(tls / "server.key"),
        "ca": str(tls / "ca.pem"), "allow_cn": allow, "log_level": "warning",
    }))  # fmt: skip


def _code(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        channel.unary_unary(HEALTH)(b"", timeout=5)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _measure(plane: str, trials: int, tls: Path, upstream: int) -> list[float]:
    config = tls / f"{plane}.yaml"
    _write(config, tls, upstream, plane, ["alice", "bob"])
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--config", str(config), "--log-level", "info"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sidecar.stderr is not None
    port = None
    for line in sidecar.stderr:
        if match := LISTENING.search(line):
            port = int(match.group(1))
            break
    assert port is not None, "the sidecar did not start"
    credentials = grpc.ssl_channel_credentials(
        (tls / "ca.pem").read_bytes(), (tls / "alice.key").read_bytes(),
        (tls / "alice.pem").read_bytes(),
    )  # fmt: skip
    latencies = []
    try:
        for _ in range(trials):
            _write(config, tls, upstream, plane, ["alice", "bob"])
            sidecar.send_signal(signal.SIGHUP)
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
                while _code(channel) != grpc.StatusCode.OK:  # allowed again (reload applied)
                    pass
                _write(config, tls, upstream, plane, ["bob"])
                start = time.perf_counter()
                sidecar.send_signal(signal.SIGHUP)
                while _code(channel) == grpc.StatusCode.OK:
                    pass
                latencies.append(time.perf_counter() - start)
    finally:
        sidecar.terminate()
        sidecar.wait(30)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reload_latency")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        tls = Path(directory)
        ca = certs.init_ca("bench CA")
        (tls / "ca.pem").write_bytes(ca.cert_pem)
        certs.issue(ca, "localhost", usage="server", ips=["127.0.0.1"]).write(tls, "server")
        certs.issue(ca, "alice", usage="client").write(tls, "alice")
        upstream = _free_port()
        app = subprocess.Popen(
            [sys.executable, "-m", "demo.app", "--listen", f"127.0.0.1:{upstream}"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ},
        )  # fmt: skip
        assert app.stdout is not None
        app.stdout.readline()  # its "listening" line
        try:
            for plane in ("splice", "grpc"):
                latencies = [s * 1000 for s in _measure(plane, args.trials, tls, upstream)]
                print(
                    f"{plane}: SIGHUP to the removed caller's first PERMISSION_DENIED, "
                    f"{len(latencies)} trials: median {statistics.median(latencies):.1f} ms, "
                    f"max {max(latencies):.1f} ms"
                )
        finally:
            app.terminate()
            app.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
