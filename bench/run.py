"""`make bench`: the same load through no proxy, the sidecar, haproxy and nginx, in one run.

The upstream is a grpc-go echo server on 127.0.0.1; the load generator is grpc-go
too (bench/go/benchtool.go), so neither is the Python under test. Every proxy does
the same job (see bench/proxies.py). For each workload and target: calls/s, p50
and p99 latency, the proxy's CPU time per 1000 calls and its peak RSS; then the
idle-connection memory test. Only ratios inside one run mean anything: absolute
figures on shared machines drift.

    python -m bench.run [--duration 4] [--rounds 5] [--only sidecar,haproxy]
                        [--json out.json] [--markdown BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from bench import proxies, toolchain
from bench.handshakes import HandshakeRow, measure_handshakes, render_handshakes
from bench.proxies import Certificates, Proxy
from sidecar import certs

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    name: str
    arguments: tuple[str, ...]


WORKLOADS = (
    Workload("unary 64 B, 1 in flight", ("-workload", "unary", "-size", "64", "-concurrency", "1")),
    Workload(
        "unary 64 B, 32 in flight",
        ("-workload", "unary", "-size", "64", "-concurrency", "32", "-connections", "4"),
    ),
    Workload(
        "bidi ping-pong 64 B, 4 streams",
        ("-workload", "pingpong", "-size", "64", "-concurrency", "4"),
    ),
    Workload(
        "unary 1 MiB, 2 in flight",
        ("-workload", "unary", "-size", str(1 << 20), "-concurrency", "2"),
    ),
    # Clients that keep no connection: each call dials, handshakes (no session reuse),
    # calls and closes.
    Workload(
        "unary 64 B, a new connection per call, 8 at a time",
        ("-workload", "newconn", "-size", "64", "-concurrency", "8"),
    ),
    Workload(  # the same, each connection resuming a TLS session (tickets)
        "unary 64 B, a new connection per call, 8 at a time, TLS resumed",
        ("-workload", "newconn", "-size", "64", "-concurrency", "8", "-resume"),
    ),
)
# The targets whose handshakes are timed (bench/handshakes.py), when they run.
HANDSHAKE_TARGETS = ("sidecar", "sidecar-2-workers", "haproxy", "nginx")
# Targets measured on some workloads only (those whose names hold one of these texts).
SOME_WORKLOADS = {"sidecar-2-workers": ("32 in flight", "a new connection per call")}


@dataclass
class Row:
    workload: str
    target: str
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_1k: float | None
    peak_rss_mib: float | None
    errors: int
    first_error: str
    rounds: list[float] = field(default_factory=list)  # calls/s of every round, in order


@dataclass
class IdleRow:
    target: str
    connections: int
    rss_before_mib: float
    rss_after_mib: float
    kib_per_connection: float


@dataclass
class ChurnRow:
    """RSS while connections come and go, one call each: it should stay flat."""

    target: str
    rss_before_mib: float
    rss_mib: list[tuple[int, float]]  # (connections done, RSS then)
    errors: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def make_certificates(directory: Path) -> Certificates:
    authority = certs.init_ca("Bench Root CA")
    (directory / "ca.pem").write_bytes(authority.cert_pem)
    server = certs.issue(authority, "localhost", usage="server", ips=["127.0.0.1"])
    server_cert, server_key = server.write(directory, "server")
    client = certs.issue(authority, proxies.ALLOWED_CN, usage="client")
    client_cert, client_key = client.write(directory, "client")
    # The CA's CRL, 10,000 certificates revoked (not the client's): sidecar+policy checks it.
    now = datetime.datetime.now(datetime.timezone.utc)
    revoked = dict.fromkeys(range(1, 10_001), now)
    crl = directory / "ca.crl"
    crl.write_bytes(
        certs.make_crl(authority, revoked, number=1).public_bytes(serialization.Encoding.PEM)
    )
    return Certificates(directory / "ca.pem", server_cert, server_key, client_cert, client_key, crl)


@contextlib.contextmanager
def upstream(benchtool: Path) -> Iterator[int]:
    server = subprocess.Popen(
        [str(benchtool), "server", "-listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not found:
            raise RuntimeError(f"the upstream did not start: {line!r}")
        yield int(found.group(1))
    finally:
        server.kill()
        server.wait()


def tls_arguments(certificates: Certificates) -> list[str]:
    return [
        "-ca", str(certificates.ca), "-cert", str(certificates.client_cert),
        "-key", str(certificates.client_key), "-server-name", "localhost",
    ]  # fmt: skip


def run_load(benchtool: Path, target: list[str], workload: Workload, duration: float) -> dict:
    done = subprocess.run(
        [str(benchtool), "load", *target, *workload.arguments,
         "-duration", f"{duration}s", "-warmup", f"{min(1.0, duration)}s"],
        capture_output=True, text=True, timeout=duration * 4 + 120,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()}")
    result: dict = json.loads(done.stdout)
    return result


def run_once(
    benchtool: Path, name: str, target: list[str], proxy: Proxy | None, workload: Workload,
    duration: float,
) -> Row:  # fmt: skip
    if proxy is not None:
        proxy.reset_peak()
        cpu_before = proxy.cpu_seconds()
    result = run_load(benchtool, target, workload, duration)
    cpu_ms_per_1k = peak = None
    if proxy is not None:
        # The CPU spent during warm-up is counted too, over the calls of both.
        spent = proxy.cpu_seconds() - cpu_before
        total_calls = result["calls"] * (1 + min(1.0, duration) / duration)
        cpu_ms_per_1k = spent * 1000 / max(total_calls, 1) * 1000
        peak = proxy.peak_rss_kib() / 1024
    return Row(workload.name, name, result["calls_per_s"], result["p50_ms"], result["p99_ms"],
               cpu_ms_per_1k, peak, result["errors"], result["first_error"])  # fmt: skip


def measure(
    benchtool: Path,
    workload: Workload,
    targets: dict[str, tuple[list[str], Proxy | None]],
    duration: float,
    rounds: int,
) -> list[Row]:
    """Each target `rounds` times, interleaved (so that a noisy moment on the machine
    does not land on one target only); per target, the round of median calls/s."""
    targets = {
        name: target
        for name, target in targets.items()
        if any(text in workload.name for text in SOME_WORKLOADS.get(name, (workload.name,)))
    }
    samples: dict[str, list[Row]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (target, proxy) in targets.items():
            samples[name].append(run_once(benchtool, name, target, proxy, workload, duration))
    rows = []
    for name, runs in samples.items():
        median = sorted(runs, key=lambda row: row.calls_per_s)[len(runs) // 2]
        median.errors = sum(row.errors for row in runs)
        median.first_error = next((row.first_error for row in runs if row.first_error), "")
        peaks = [row.peak_rss_mib for row in runs if row.peak_rss_mib is not None]
        median.peak_rss_mib = max(peaks) if peaks else None
        median.rounds = [row.calls_per_s for row in runs]
        spread = ", ".join(f"{row.calls_per_s:.0f}" for row in runs)
        print(f"  {workload.name:32} {name:13} {median.calls_per_s:9.0f} calls/s ({spread})",
              flush=True)  # fmt: skip
        rows.append(median)
    return rows


def measure_idle(benchtool: Path, target: list[str], proxy: Proxy, count: int) -> IdleRow:
    before = proxy.rss_kib()
    holder = subprocess.Popen(
        [str(benchtool), "idle", *target, "-connections", str(count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "ready":
            raise RuntimeError(
                f"idle connections failed: {holder.stderr.read() if holder.stderr else ''}"
            )
        after = proxy.rss_kib()
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(60)
    return IdleRow(proxy.name, count, before / 1024, after / 1024, (after - before) / count)


def measure_churn(
    benchtool: Path, target: list[str], proxy: Proxy, count: int, every: int
) -> ChurnRow:
    """Open `count` connections, 8 at a time, each for one call; RSS after every `every`."""
    before = proxy.rss_kib() / 1024
    samples: list[tuple[int, float]] = []
    churn = subprocess.Popen(
        [str(benchtool), "churn", *target, "-connections", str(count), "-concurrency", "8",
         "-every", str(every)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert churn.stdout is not None
    report: dict[str, object] = {}
    for line in churn.stdout:
        if line.startswith("done "):
            samples.append((int(line.split()[1]), proxy.rss_kib() / 1024))
        elif line.startswith("{"):
            report = json.loads(line)
    churn.wait(60)
    if not report:
        raise RuntimeError(f"churn failed: {churn.stderr.read() if churn.stderr else ''}")
    return ChurnRow(proxy.name, before, samples, int(report["errors"]))  # type: ignore[call-overload]


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    versions = {}
    for tool, command in (("haproxy", ["haproxy", "-v"]), ("nginx", ["nginx", "-v"]),
                          ("go", ["go", "version"])):  # fmt: skip
        with contextlib.suppress(OSError):
            done = subprocess.run(command, capture_output=True, text=True)
            versions[tool] = (done.stdout or done.stderr).splitlines()[0]
    import grpc

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model.group(1) if model else platform.processor(),
        "cores": str(len(re.findall(r"^processor\s*:", cpuinfo, re.MULTILINE))),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        **versions,
    }


def ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def render(
    info: dict[str, str],
    rows: list[Row],
    idle: list[IdleRow],
    duration: float,
    rounds: int,
    churn: list[ChurnRow] = (),  # type: ignore[assignment]
) -> str:
    lines = [
        "| workload | target | calls/s | rounds: lowest-highest | p50 ms | p99 ms "
        "| proxy CPU ms / 1k calls | proxy peak RSS MiB | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cpu = f"{row.cpu_ms_per_1k:.1f}" if row.cpu_ms_per_1k is not None else "-"
        rss = f"{row.peak_rss_mib:.1f}" if row.peak_rss_mib is not None else "-"
        spread = f"{min(row.rounds):.0f}-{max(row.rounds):.0f}" if row.rounds else "-"
        lines.append(
            f"| {row.workload} | {row.target} | {row.calls_per_s:.0f} | {spread} "
            f"| {row.p50_ms:.3f} | {row.p99_ms:.3f} | {cpu} | {rss} | {row.errors} |"
        )
    lines += ["", "Ratios (same run):", "",
              "| workload | sidecar / haproxy calls/s | sidecar / nginx calls/s "
              "| sidecar / haproxy CPU per call | sidecar / direct calls/s "
              "| latency added at p50: sidecar, haproxy, nginx (ms) |",
              "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    by_key = {(row.workload, row.target): row for row in rows}
    for workload in dict.fromkeys(row.workload for row in rows):
        sidecar, haproxy, nginx, direct = (
            by_key.get((workload, target)) for target in ("sidecar", "haproxy", "nginx", "direct")
        )
        added = ", ".join(
            f"{row.p50_ms - direct.p50_ms:+.3f}" if row and direct else "-"
            for row in (sidecar, haproxy, nginx)
        )
        lines.append(
            f"| {workload} "
            f"| {ratio(sidecar and sidecar.calls_per_s, haproxy and haproxy.calls_per_s)} "
            f"| {ratio(sidecar and sidecar.calls_per_s, nginx and nginx.calls_per_s)} "
            f"| {ratio(sidecar and sidecar.cpu_ms_per_1k, haproxy and haproxy.cpu_ms_per_1k)} "
            f"| {ratio(sidecar and sidecar.calls_per_s, direct and direct.calls_per_s)} "
            f"| {added} |"
        )
    lines += _logging_cost(rows)
    lines += _workers(rows)
    if idle:
        lines += ["", "| idle mTLS connections | target | RSS before MiB | RSS after MiB "
                  "| KiB per connection |", "|---:|---|---:|---:|---:|"]  # fmt: skip
        for row in idle:
            lines.append(
                f"| {row.connections} | {row.target} | {row.rss_before_mib:.1f} "
                f"| {row.rss_after_mib:.1f} | {row.kib_per_connection:.1f} |"
            )
    for turnover in churn:
        done = [count for count, _ in turnover.rss_mib]
        rss = " | ".join(f"{mib:.1f}" for _, mib in turnover.rss_mib)
        lines += ["", f"Connection churn through {turnover.target}: {done[-1] if done else 0} "
                  "connections, 8 open at a time, one call each "
                  f"({turnover.errors} errors); RSS before: {turnover.rss_before_mib:.1f} MiB",
                  "", "| connections | " + " | ".join(str(count) for count in done) + " |",
                  "|---|" + "---:|" * len(done), f"| RSS MiB | {rss} |"]  # fmt: skip
    described = ", ".join(f"{key} {value}" for key, value in info.items())
    return "\n".join(
        [f"Machine: {described}.",
         f"Each figure: the median of {rounds} rounds of {duration:g} s (each after a 1 s "
         "warm-up), the targets alternating round by round.", "",
         *lines]
    )  # fmt: skip


def _workers(rows: list[Row]) -> list[str]:
    """What a second worker gives: calls/s and CPU per call of `--workers 2` over one
    worker's, and its calls/s over haproxy's, in the same run."""
    by_key = {(row.workload, row.target): row for row in rows}
    lines: list[str] = []
    for workload in dict.fromkeys(row.workload for row in rows):
        two, one, haproxy = (
            by_key.get((workload, target)) for target in ("sidecar-2-workers", "sidecar", "haproxy")
        )
        if two is None or one is None:
            continue
        lines.append(
            f"| {workload} | {ratio(two.calls_per_s, one.calls_per_s)} "
            f"| {ratio(two.cpu_ms_per_1k, one.cpu_ms_per_1k)} "
            f"| {ratio(two.calls_per_s, haproxy and haproxy.calls_per_s)} |"
        )
    if not lines:
        return []
    return ["", "Two workers (same run; the load generator and the upstream share the same "
            "two cores):", "",
            "| workload | 2 workers / 1: calls/s | 2 workers / 1: CPU per call "
            "| 2 workers / haproxy: calls/s |", "|---|---:|---:|---:|", *lines]  # fmt: skip


def _logging_cost(rows: list[Row]) -> list[str]:
    """What logging (and, for the sidecar, its metrics) costs each proxy: calls/s with it on
    over calls/s with it off, and the CPU it adds per call, in the same run."""
    by_key = {(row.workload, row.target): row for row in rows}
    pairs = (("sidecar+log", "sidecar"), ("sidecar+log+metrics", "sidecar"),
             ("haproxy+log", "haproxy"))  # fmt: skip
    lines: list[str] = []
    for workload in dict.fromkeys(row.workload for row in rows):
        cells = []
        for on, off in pairs:
            with_it, without = by_key.get((workload, on)), by_key.get((workload, off))
            if with_it is None or without is None:
                cells.append("-")
                continue
            added = "-"
            if with_it.cpu_ms_per_1k is not None and without.cpu_ms_per_1k is not None:
                added = f"{with_it.cpu_ms_per_1k - without.cpu_ms_per_1k:+.1f} us"
            cells.append(f"{ratio(with_it.calls_per_s, without.calls_per_s)} ({added})")
        if any(cell != "-" for cell in cells):
            lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["", "What logging costs (same run): calls/s with it over calls/s without, and the "
            "CPU it adds per call:", "",
            "| workload | sidecar+log / sidecar | sidecar+log+metrics / sidecar "
            "| haproxy+log / haproxy |", "|---|---:|---:|---:|", *lines]  # fmt: skip


MARKDOWN_HEAD = """# Benchmarks

Regenerated by `make bench` (`python -m bench.run --markdown BENCHMARKS.md`). The upstream and
the load generator are grpc-go (bench/go/benchtool.go); every proxy terminates mTLS on 127.0.0.1,
allows only CN=bench-client and relays to the plaintext upstream (bench/proxies.py has the exact
haproxy and nginx configurations). Proxy CPU is user + system time of the proxy's processes during
the workload, divided by the calls made. All processes share the machine's cores, so only ratios
inside one run count.

"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument(
        "--rounds", type=int, default=5, help="measurements per workload and target (median)"
    )
    parser.add_argument(
        "--only", help=f"comma-separated targets ({', '.join(['direct', *proxies.PROXIES])})"
    )
    parser.add_argument(
        "--workload", help="run only the workloads whose name holds this text (e.g. '32 in flight')"
    )
    parser.add_argument("--idle", type=int, default=1000, help="idle connections (0: skip)")
    parser.add_argument(
        "--churn", type=int, default=20_000, help="connections for the churn test (0: skip)"
    )
    parser.add_argument(
        "--handshakes", type=int, default=3,
        help="seconds per round of openssl s_time against each proxy (0: skip)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the report as Markdown here")
    args = parser.parse_args(argv)
    targets = ["direct", *proxies.PROXIES]
    workloads = [w for w in WORKLOADS if args.workload is None or args.workload in w.name]
    if not workloads:
        parser.error(f"no workload's name holds {args.workload!r}")
    if args.only:
        targets = [name for name in args.only.split(",") if name]
        unknown = set(targets) - {"direct", *proxies.PROXIES}
        if unknown:
            parser.error(f"unknown targets: {', '.join(sorted(unknown))}")

    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as scratch:
        workdir = Path(scratch)
        try:
            benchtool = toolchain.build_go_program(
                ROOT / "bench" / "go" / "benchtool.go", [ROOT / "bench" / "echo.proto"],
                workdir / "go", "sidecar.bench",
            )  # fmt: skip
        except toolchain.ToolchainError as error:
            print(f"bench: {error}", file=sys.stderr)
            return 1
        certificates = make_certificates(workdir)
        rows: list[Row] = []
        idle: list[IdleRow] = []
        churn: list[ChurnRow] = []
        handshake_rows: list[HandshakeRow] = []
        with upstream(benchtool) as upstream_port, contextlib.ExitStack() as running:
            # Every target is up for the whole run (idle when not under load), so that
            # the rounds of one workload can alternate between them.
            started: dict[str, tuple[list[str], Proxy | None]] = {}
            for name in targets:
                if name == "direct":
                    started[name] = (["-target", f"127.0.0.1:{upstream_port}"], None)
                    continue
                port = free_port()
                proxy = proxies.PROXIES[name](certificates, port, upstream_port, workdir)
                running.callback(proxy.stop)
                target = ["-target", f"127.0.0.1:{port}", *tls_arguments(certificates)]
                started[name] = (target, proxy)
            for workload in workloads:
                rows += measure(benchtool, workload, started, args.duration, args.rounds)
            timed: dict[str, tuple[list[str], Proxy]] = {}
            for name in HANDSHAKE_TARGETS:
                target, maybe_proxy = started.get(name, ([], None))
                if maybe_proxy is not None:
                    timed[name] = (target, maybe_proxy)
            if args.handshakes and timed:
                handshake_rows = measure_handshakes(
                    benchtool, timed, certificates, args.handshakes, args.rounds
                )
            if args.idle:
                for target, maybe_proxy in started.values():
                    if maybe_proxy is not None:
                        idle.append(measure_idle(benchtool, target, maybe_proxy, args.idle))
            if args.churn and "sidecar" in started:
                target, maybe_proxy = started["sidecar"]
                assert maybe_proxy is not None
                every = max(1, args.churn // 10)
                churn.append(measure_churn(benchtool, target, maybe_proxy, args.churn, every))
    info = machine()
    report = render(info, rows, idle, args.duration, args.rounds, churn)
    report += "\n".join(["", *render_handshakes(handshake_rows, args.handshakes, args.rounds)])
    print()
    print(report)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": info, "duration": args.duration, "rounds": args.rounds,
                 "rows": [asdict(row) for row in rows], "idle": [asdict(row) for row in idle],
                 "churn": [asdict(row) for row in churn],
                 "handshakes": [asdict(row) for row in handshake_rows]},
                indent=2,
            )
        )  # fmt: skip
    if args.markdown:
        args.markdown.write_text(MARKDOWN_HEAD + report + "\n")
    failed = [row for row in rows if row.errors]
    for row in failed:
        print(
            f"bench: {row.target} / {row.workload}: {row.errors} errors, first: {row.first_error}",
            file=sys.stderr,
        )
    # An error through the sidecar fails the run. Others are reported only: grpc-go 1.33
    # itself now and then ends a 1 MiB call with "unexpected EOF", without any proxy.
    return 1 if any(row.target.startswith("sidecar") for row in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
