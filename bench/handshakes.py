"""New mTLS connections per second through each proxy, and the proxy's CPU for each.

Connections are made one after another for a while, each a TLS handshake with the bench's
client certificate and no request: what is measured is the proxy's cost of accepting,
authenticating and setting up a caller, which clients that do not keep connections
(probes, batch jobs, a fleet reconnecting after a deploy) pay. The proxy's CPU over the
connections made gives its CPU per handshake. Three clients:

- `benchtool handshakes` (Go): each connection is closed once the proxy has answered the
  client's last flight with a session ticket, which a TLS 1.3 server sends only after it
  has verified the client's certificate: every handshake counted is one the proxy did.
- the same with `-resume`: every connection resumes a session (its ticket).
- `openssl s_time -new`, the usual tool: it closes each connection as soon as it has sent
  its last flight, unanswered. A proxy may then drop the connection without verifying
  that flight: haproxy does for most of them (counted with a uprobe on
  X509_verify_cert, 2026-12-02: 692 verifications for 2205 connections), so this row
  flatters it; the sidecar verifies every one. It is kept for comparison with earlier runs.
  (Its -reuse cannot resume a TLS 1.3 session: it never reads the tickets.)
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.proxies import Certificates, Proxy

MODES = {
    "answered": "new mTLS connections, each answered (Go)",
    "resumed": "resumed TLS 1.3 sessions, each answered (Go)",
    "s_time": "new mTLS connections, closed unanswered (openssl s_time -new)",
}
_COUNTED = re.compile(r"(\d+) connections in [\d.]+s")


@dataclass
class HandshakeRow:
    mode: str  # a key of MODES
    target: str
    connections_per_s: float
    cpu_ms_per_connection: float
    rounds: list[float] = field(default_factory=list)  # connections/s of every round
    resumed: float | None = None  # the share of connections that resumed (mode "resumed")


def _connect(
    benchtool: Path, target: list[str], certificates: Certificates, mode: str, seconds: int
) -> tuple[int, int]:
    """Connections made in `seconds` by the mode's client, and how many resumed a session."""
    if mode == "s_time":
        port = target[target.index("-target") + 1].rsplit(":", 1)[1]
        command = [
            "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
            "-time", str(seconds), "-cert", str(certificates.client_cert),
            "-key", str(certificates.client_key), "-CAfile", str(certificates.ca),
        ]  # fmt: skip
    else:
        resume = ["-resume"] if mode == "resumed" else []
        command = [str(benchtool), "handshakes", *target, "-duration", f"{seconds}s", *resume]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 4 + 60)
    if mode == "s_time":
        counted = _COUNTED.findall(done.stdout)
        if done.returncode != 0 or not counted:
            raise RuntimeError(f"s_time failed: {done.stderr.strip()}")
        return int(counted[-1]), 0
    if done.returncode != 0:
        raise RuntimeError(f"benchtool handshakes failed: {done.stderr.strip()}")
    report = json.loads(done.stdout)
    if report["errors"]:
        raise RuntimeError(f"benchtool handshakes: {report['errors']} errors, "
                           f"the first: {report['first_error']}")  # fmt: skip
    # A proxy whose processes do not share ticket keys resumes only the sessions that land on
    # the process that issued them: reported with the row, not an error.
    return report["connections"], report["resumed"]


def handshakes_once(
    benchtool: Path,
    target: list[str],
    proxy: Proxy,
    certificates: Certificates,
    mode: str,
    seconds: int,
) -> HandshakeRow:
    """One round of one mode's client against a proxy."""
    cpu_before = proxy.cpu_seconds()
    connections, resumed = _connect(benchtool, target, certificates, mode, seconds)
    spent = proxy.cpu_seconds() - cpu_before
    return HandshakeRow(
        mode, proxy.name, connections / seconds, spent * 1000 / max(connections, 1),
        resumed=resumed / max(connections, 1) if mode == "resumed" else None,
    )  # fmt: skip


def measure_handshakes(
    benchtool: Path,
    targets: dict[str, tuple[list[str], Proxy]],
    certificates: Certificates,
    seconds: int,
    rounds: int,
) -> list[HandshakeRow]:
    """Each mode, each proxy `rounds` times interleaved; per proxy, the median round."""
    rows = []
    for mode in MODES:
        samples: dict[str, list[HandshakeRow]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (target, proxy) in targets.items():
                samples[name].append(
                    handshakes_once(benchtool, target, proxy, certificates, mode, seconds)
                )
        for runs in samples.values():
            median = sorted(runs, key=lambda row: row.connections_per_s)[len(runs) // 2]
            median.rounds = [row.connections_per_s for row in runs]
            spread = ", ".join(f"{row.connections_per_s:.0f}" for row in runs)
            print(f"  {MODES[mode]:62} {median.target:17} {median.connections_per_s:6.0f}/s "
                  f"({spread})", flush=True)  # fmt: skip
            rows.append(median)
    return rows


def render_handshakes(rows: list[HandshakeRow], seconds: int, rounds: int) -> list[str]:
    """The handshake table, and each target's ratios to haproxy."""
    if not rows:
        return []
    lines = ["", f"Handshakes (one connection at a time, median of {rounds} rounds of "
             f"{seconds} s; CPU: the proxy's over the connections made; see "
             "bench/handshakes.py for why s_time's row flatters haproxy):", "",
             "| connections | target | per second | rounds: lowest-highest "
             "| proxy CPU ms per connection | / haproxy per second | / haproxy CPU | resumed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    by_key = {(row.mode, row.target): row for row in rows}
    for row in rows:
        haproxy = by_key.get((row.mode, "haproxy"))
        versus = ("-", "-")
        if haproxy is not None:
            rate = row.connections_per_s / haproxy.connections_per_s
            cpu = row.cpu_ms_per_connection / haproxy.cpu_ms_per_connection
            versus = (f"{rate:.2f}x", f"{cpu:.2f}x")
        resumed = "-" if row.resumed is None else f"{row.resumed:.0%}"
        lines.append(
            f"| {MODES[row.mode]} | {row.target} | {row.connections_per_s:.0f} "
            f"| {min(row.rounds):.0f}-{max(row.rounds):.0f} | {row.cpu_ms_per_connection:.3f} "
            f"| {versus[0]} | {versus[1]} | {resumed} |"
        )
    return lines
