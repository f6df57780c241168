"""New mTLS connections per second through each proxy, with `openssl s_time -new`.

s_time opens connections one after another for a while, each a whole TLS handshake with
the bench's client certificate, and closes it without sending a request: what it
measures is the proxy's cost of accepting, authenticating and setting up a caller, which
clients that do not keep connections (probes, batch jobs, a fleet reconnecting after a
deploy) pay. The proxy's CPU over the connections made gives its CPU per handshake.
(s_time's -reuse cannot resume a TLS 1.3 session: it never reads the tickets, which come
after the handshake. Resumption is measured by the load generator instead: the
workload "a new connection per call ..., TLS resumed".)
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from bench.proxies import Certificates, Proxy

MODES = {"-new": "new mTLS connections (openssl s_time -new)"}
_COUNTED = re.compile(r"(\d+) connections in [\d.]+s")


@dataclass
class HandshakeRow:
    mode: str  # a key of MODES
    target: str
    connections_per_s: float
    cpu_ms_per_connection: float
    rounds: list[float] = field(default_factory=list)  # connections/s of every round


def handshakes_once(
    proxy: Proxy, certificates: Certificates, mode: str, seconds: int
) -> HandshakeRow:
    """One round of s_time against a proxy."""
    cpu_before = proxy.cpu_seconds()
    done = subprocess.run(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{proxy.port}", mode,
         "-time", str(seconds), "-cert", str(certificates.client_cert),
         "-key", str(certificates.client_key), "-CAfile", str(certificates.ca)],
        capture_output=True, text=True, timeout=seconds * 4 + 60,
    )  # fmt: skip
    spent = proxy.cpu_seconds() - cpu_before
    counted = _COUNTED.findall(done.stdout)
    if done.returncode != 0 or not counted:
        raise RuntimeError(f"s_time {mode} against {proxy.name} failed: {done.stderr.strip()}")
    connections = int(counted[-1])
    return HandshakeRow(mode, proxy.name, connections / seconds, spent * 1000 / max(connections, 1))


def measure_handshakes(
    proxies: dict[str, Proxy], certificates: Certificates, seconds: int, rounds: int
) -> list[HandshakeRow]:
    """Each mode, each proxy `rounds` times interleaved; per proxy, the median round."""
    rows = []
    for mode in MODES:
        samples: dict[str, list[HandshakeRow]] = {name: [] for name in proxies}
        for _ in range(rounds):
            for name, proxy in proxies.items():
                samples[name].append(handshakes_once(proxy, certificates, mode, seconds))
        for runs in samples.values():
            median = sorted(runs, key=lambda row: row.connections_per_s)[len(runs) // 2]
            median.rounds = [row.connections_per_s for row in runs]
            spread = ", ".join(f"{row.connections_per_s:.0f}" for row in runs)
            print(f"  {MODES[mode]:48} {median.target:13} {median.connections_per_s:6.0f}/s "
                  f"({spread})", flush=True)  # fmt: skip
            rows.append(median)
    return rows


def render_handshakes(rows: list[HandshakeRow], seconds: int, rounds: int) -> list[str]:
    """The handshake table, and each target's ratios to haproxy."""
    if not rows:
        return []
    lines = ["", f"Handshakes (`openssl s_time`, one connection at a time, median of {rounds} "
             f"rounds of {seconds} s; CPU: the proxy's over the connections made):", "",
             "| connections | target | per second | rounds: lowest-highest "
             "| proxy CPU ms per connection | / haproxy per second | / haproxy CPU |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    by_key = {(row.mode, row.target): row for row in rows}
    for row in rows:
        haproxy = by_key.get((row.mode, "haproxy"))
        versus = ("-", "-")
        if haproxy is not None:
            rate = row.connections_per_s / haproxy.connections_per_s
            cpu = row.cpu_ms_per_connection / haproxy.cpu_ms_per_connection
            versus = (f"{rate:.2f}x", f"{cpu:.2f}x")
        lines.append(
            f"| {MODES[row.mode]} | {row.target} | {row.connections_per_s:.0f} "
            f"| {min(row.rounds):.0f}-{max(row.rounds):.0f} | {row.cpu_ms_per_connection:.3f} "
            f"| {versus[0]} | {versus[1]} |"
        )
    return lines
