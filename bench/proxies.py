"""The proxies the benchmark compares, each configured for the same job.

The job: terminate mTLS on 127.0.0.1 (TLS 1.2+, ALPN h2, client certificate
required and verified against the CA), allow only CN=bench-client, and relay
gRPC to the plaintext upstream. haproxy and nginx come from Debian's packages.
Each proxy is a running process tree whose CPU time and memory can be read.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench import toolchain

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_CN = "bench-client"
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    crl: Path  # the CA's, revoking 10,000 other certificates


class Proxy:
    """A proxy's process tree: started, measured, stopped."""

    def __init__(self, name: str, command: Sequence[str], port: int, log: Path) -> None:
        self.name = name
        self.port = port
        self._log = log.open("w")
        self.process = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def pids(self) -> list[int]:
        """The process and its descendants (nginx's workers, say)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
        found, pending = [], [self.process.pid]
        while pending:
            pid = pending.pop()
            found.append(pid)
            pending.extend(children.get(pid, []))
        return found

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the whole tree so far."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / _TICKS

    def _status_kib(self, key: str) -> int:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            found = re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)
            total += int(found.group(1)) if found else 0
        return total

    def rss_kib(self) -> int:
        return self._status_kib("VmRSS")

    def peak_rss_kib(self) -> int:
        """Peak resident memory of the tree since the last reset_peak()."""
        return self._status_kib("VmHWM")

    def reset_peak(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(OSError):  # the process may have just exited
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to VmRSS

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def wait_listening(port: int, proxy: Proxy, log: Path, timeout: float = 20) -> None:
    """Wait until something accepts on 127.0.0.1:port (polling /proc/net/tcp, no connects)."""
    wanted = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            raise RuntimeError(f"{proxy.name} exited: {log.read_text()[-2000:]}")
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1].endswith(wanted.strip()) and fields[3] == "0A":  # LISTEN
                    return
        time.sleep(0.05)  # polling a kernel table, not synchronising with the proxy
    raise RuntimeError(f"{proxy.name} did not listen on {port} within {timeout}s")


def start_sidecar(
    certs: Certificates,
    port: int,
    upstream: int,
    workdir: Path,
    *,
    name: str = "sidecar",
    extra: Sequence[str] = ("--log-level", "warning"),
) -> Proxy:
    """The sidecar as deployed; by default without the access log, as haproxy and nginx
    are configured here (their logs are off)."""
    log = workdir / f"{name}.log"
    command = [
        sys.executable, "-m", "sidecar", "--listen", f"127.0.0.1:{port}",
        "--upstream", f"127.0.0.1:{upstream}", "--cert", str(certs.server_cert),
        "--key", str(certs.server_key), "--ca", str(certs.ca), "--allow-cn", ALLOWED_CN,
        *extra,
    ]  # fmt: skip
    proxy = Proxy(name, command, port, log)
    wait_listening(port, proxy, log)
    return proxy


def start_sidecar_logging(certs: Certificates, port: int, upstream: int, workdir: Path) -> Proxy:
    """The sidecar with its default access log: one line per call (to a file)."""
    return start_sidecar(certs, port, upstream, workdir, name="sidecar+log", extra=())


def start_sidecar_logging_metrics(
    certs: Certificates, port: int, upstream: int, workdir: Path
) -> Proxy:
    """The sidecar with its access log and its metrics (an admin listener) on: what an
    operator runs in production; compare with haproxy+log."""
    return start_sidecar(
        certs, port, upstream, workdir, name="sidecar+log+metrics",
        extra=("--admin", "127.0.0.1:0"),
    )  # fmt: skip


def start_sidecar_workers(certs: Certificates, port: int, upstream: int, workdir: Path) -> Proxy:
    """The sidecar with two workers (`--workers 2`), its logs off as in `sidecar`."""
    return start_sidecar(
        certs, port, upstream, workdir, name="sidecar-2-workers",
        extra=("--log-level", "warning", "--workers", "2"),
    )  # fmt: skip


def start_sidecar_grpc(certs: Certificates, port: int, upstream: int, workdir: Path) -> Proxy:
    """The per-call data plane (grpc.aio), still used by `data_plane: grpc`."""
    return start_sidecar(
        certs, port, upstream, workdir, name="sidecar-grpc",
        extra=("--log-level", "warning", "--data-plane", "grpc"),
    )  # fmt: skip


def start_sidecar_policy(certs: Certificates, port: int, upstream: int, workdir: Path) -> Proxy:
    """The sidecar deciding every call by 10 method rules (the bench client matches only the
    last, the worst case), checking the caller against a CRL of 10,000 entries, and sending
    the caller's identity header to the app."""
    others = [
        {"action": "allow" if index % 2 else "deny", "cn": [f"team-{index}"],
         "methods": [f"/svc{index}.Service/*", "/bench.Echo/Other"]}
        for index in range(9)
    ]  # fmt: skip
    rules = [*others, {"action": "allow", "cn": [ALLOWED_CN], "methods": ["/bench.Echo/*"]}]
    config = workdir / "sidecar-policy.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "upstream": f"127.0.0.1:{upstream}",
        "cert": str(certs.server_cert), "key": str(certs.server_key), "ca": str(certs.ca),
        "rules": rules, "identity_header": True, "crl": str(certs.crl), "log_level": "warning",
    }))  # fmt: skip
    log = workdir / "sidecar+policy.log"
    command = [sys.executable, "-m", "sidecar", "--config", str(config)]
    proxy = Proxy("sidecar+policy", command, port, log)
    wait_listening(port, proxy, log)
    return proxy


def start_haproxy(
    certs: Certificates, port: int, upstream: int, workdir: Path, *, logged: bool = False
) -> Proxy:
    """haproxy for the same job; logged: one line per request (its HTTP log format) to
    its standard output, a file here, as the sidecar's access log goes to one."""
    toolchain.ensure_debian_packages(["haproxy"], ["haproxy"])
    name = "haproxy+log" if logged else "haproxy"
    logging_lines = "    log stdout format raw local0\n" if logged else ""
    option_lines = "    log global\n    option httplog\n" if logged else ""
    bundle = workdir / "haproxy.pem"
    bundle.write_bytes(certs.server_cert.read_bytes() + certs.server_key.read_bytes())
    bundle.chmod(0o600)
    config = workdir / f"{name}.cfg"
    config.write_text(f"""\
global
    maxconn 9000
    ssl-default-bind-options ssl-min-ver TLSv1.2
{logging_lines}
defaults
    mode http
{option_lines}    timeout connect 5s
    timeout client 300s
    timeout server 300s

frontend mtls
    bind 127.0.0.1:{port} ssl crt {bundle} ca-file {certs.ca} verify required alpn h2
    http-request deny deny_status 403 unless {{ ssl_c_s_dn(CN) -m str {ALLOWED_CN} }}
    default_backend app

backend app
    server app 127.0.0.1:{upstream} proto h2
""")
    log = workdir / f"{name}.log"
    proxy = Proxy(name, ["haproxy", "-db", "-f", str(config)], port, log)
    wait_listening(port, proxy, log)
    return proxy


def start_nginx(certs: Certificates, port: int, upstream: int, workdir: Path) -> Proxy:
    toolchain.ensure_debian_packages(["nginx"], ["nginx"])
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(f"""\
worker_processes auto;
worker_rlimit_nofile 20000;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    map $ssl_client_s_dn $allowed {{
        "~(^|,)CN={ALLOWED_CN}(,|$)" 1;
        default 0;
    }}
    upstream app {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {certs.server_cert};
        ssl_certificate_key {certs.server_key};
        ssl_client_certificate {certs.ca};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
        client_max_body_size 0;
        location / {{
            if ($allowed = 0) {{ return 403; }}
            grpc_pass grpc://app;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
""")
    log = prefix / "stderr.log"
    command = ["nginx", "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
    proxy = Proxy("nginx", command, port, log)
    wait_listening(port, proxy, log)
    return proxy


ProxyStarter = Callable[[Certificates, int, int, Path], Proxy]
PROXIES: dict[str, ProxyStarter] = {
    "sidecar": start_sidecar,
    "sidecar+log": start_sidecar_logging,
    "sidecar-grpc": start_sidecar_grpc,
    "sidecar+policy": start_sidecar_policy,
    "sidecar+log+metrics": start_sidecar_logging_metrics,
    "sidecar-2-workers": start_sidecar_workers,
    "haproxy": start_haproxy,
    "haproxy+log": functools.partial(start_haproxy, logged=True),
    "nginx": start_nginx,
}
