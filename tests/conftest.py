"""Shared fixtures: a PKI made by the tests, the probe upstream, the sidecar as a process."""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from bench import toolchain
from sidecar import certs
from sidecar.observe.logs import BatchingHandler
from tests.probe import Probe

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (?P<host>[^\s]+):(?P<port>\d+)")
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class Pki:
    """Certificates and keys written to a temporary directory, made fresh for each session."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca = certs.init_ca("Test Root CA")
        self.other_ca = certs.init_ca("Some Other CA")
        (directory / "ca.pem").write_bytes(self.ca.cert_pem)
        (directory / "other-ca.pem").write_bytes(self.other_ca.cert_pem)
        self._issue("server", self.ca, "localhost", usage="server", ips=["127.0.0.1", "::1"])
        self._issue("alice", self.ca, "alice", usage="client")
        self._issue("mallory", self.ca, "mallory", usage="client")
        self._issue(
            "carol",
            self.ca,
            "carol",
            usage="client",
            dns=["carol.svc.example.org"],
            uris=["spiffe://example.org/ns/prod/sa/carol"],
        )
        self._issue("stranger", self.other_ca, "alice", usage="client")  # right name, wrong CA
        self._issue(  # a remote that egress must not trust
            "rogue-server", self.other_ca, "localhost", usage="server", ips=["127.0.0.1"]
        )
        self._issue(
            "expired",
            self.ca,
            "alice",
            usage="client",
            days=1,
            not_before=now - datetime.timedelta(days=3),
        )
        self._issue(
            "notyet", self.ca, "alice", usage="client", not_before=now + datetime.timedelta(days=2)
        )
        self._issue(
            "server-eku",
            self.ca,
            "alice",
            usage="client",
            extended_key_usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        )

    def _issue(self, name: str, ca: certs.Issued, cn: str, **kwargs: object) -> None:
        certs.issue(ca, cn, **kwargs).write(self.dir, name)  # type: ignore[arg-type]

    def issue_server(self, directory: Path) -> int:
        """A fresh server certificate for localhost and 127.0.0.1, written as server.pem and
        server.key into directory (where a sidecar under test reads them); its serial."""
        issued = certs.issue(self.ca, "localhost", usage="server", ips=["127.0.0.1"])
        issued.write(directory, "server")
        return issued.certificate.serial_number

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def client_credentials(
        self, name: str | None, *, key_of: str | None = None
    ) -> grpc.ChannelCredentials:
        """Credentials of client `name` (None: no client certificate) trusting the test CA."""
        ca = (self.dir / "ca.pem").read_bytes()
        if name is None:
            return grpc.ssl_channel_credentials(ca)
        return grpc.ssl_channel_credentials(
            ca, self.key(key_of or name).read_bytes(), self.cert(name).read_bytes()
        )


def make_crl(
    ca: certs.Issued,
    revoked: Iterable[int] = (),
    *,
    last_update: datetime.datetime | None = None,
    next_update: datetime.datetime | None = None,
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
    signer: certs.Issued | None = None,
) -> x509.CertificateRevocationList:
    """A CRL of ca, made with cryptography, revoking the given serials (by default current
    from a day ago for a week)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(last_update or now - day)
        .next_update(next_update or now + 7 * day)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - day)
            .build()
        )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign((signer or ca).key, hashes.SHA256())


@contextlib.contextmanager
def log_configured(formatter: logging.Formatter) -> Iterator[io.StringIO]:
    """The root logger as logs.configure leaves it (one BatchingHandler; pytest's own
    capture set aside), writing to the stream yielded, at INFO."""
    stream = io.StringIO()
    handler = BatchingHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        handler.flush()
        root.handlers[:] = saved
        root.setLevel(level)


def wait_until(check: Callable[[], bool], timeout: float = 15) -> None:
    """Wait for a condition the sidecar reaches on its own clock (its readiness checks run
    each second; a scrape counts what has ended): polled every 50 ms, never slept on
    blindly; fails the test when it is not met within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition was never met"
        time.sleep(0.05)


def install_debian_packages(packages: Sequence[str], needs: Sequence[str]) -> None:
    """Install what a test needs from Debian's packages, or fail the test saying why."""
    try:
        toolchain.ensure_debian_packages(packages, needs)
    except toolchain.ToolchainError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def probe() -> Iterator[Probe]:
    upstream = Probe()
    upstream.start()
    yield upstream
    upstream.stop()


class ChildProcess:
    """A command run in the background, its stdout and stderr collected line by line."""

    def __init__(
        self, command: Sequence[str], env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._collect, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for reader in self._readers:
            reader.start()
        self.port = 0

    def _collect(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def _wait_until(self, seen: Callable[[], bool], timeout: float) -> None:
        """Wait until seen() holds of the lines, or the process has ended and said all."""
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    seen()
                    or (
                        self.proc.poll() is not None
                        and not any(reader.is_alive() for reader in self._readers)
                    )
                ),
                timeout,
            )

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 20) -> re.Match[str]:
        """Wait until a line matching pattern appears; fail with the output if it does not."""
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            found[:] = [m for line in self.lines if (m := regex.search(line))]
            return bool(found)

        self._wait_until(seen, timeout)
        if not found:
            raise AssertionError(
                f"no line matching {regex.pattern!r}; the process said:\n{self.output}"
            )
        return found[-1]

    def wait_for_count(self, text: str, count: int, timeout: float = 20) -> None:
        """Wait until `count` lines hold `text` (the same line written again, say)."""

        self._wait_until(lambda: sum(text in line for line in self.lines) >= count, timeout)
        found = sum(text in line for line in self.lines)
        if found < count:
            raise AssertionError(
                f"{found} lines hold {text!r}, not {count}; the process said:\n{self.output}"
            )

    def wait_ready(self, pattern: str | re.Pattern[str] = LISTENING) -> int:
        """Wait for the line announcing the listening port (group "port"), and return it."""
        self.port = int(self.wait_for(pattern).group("port"))
        return self.port

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait_exit()


class SidecarProcess(ChildProcess):
    """`python -m sidecar ARGS` as a child process."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> None:
        super().__init__([*prefix, sys.executable, "-m", "sidecar", *args], env)
        self.args = args

    def channel(
        self, pki: Pki, client: str | None = "alice", *, key_of: str | None = None
    ) -> grpc.Channel:
        """A client channel to this sidecar with client certificate `client`."""
        return grpc.secure_channel(
            f"127.0.0.1:{self.port}",
            pki.client_credentials(client, key_of=key_of),
            options=UNLIMITED,
        )


class Chain:
    """Two sidecars in a row: a plaintext client talks to egress, which speaks mTLS to ingress.

    Quacks like a SidecarProcess where relay tests need it: `channel()` opens the
    local plaintext channel, `lines` are the ingress sidecar's log lines.
    """

    def __init__(self, egress: SidecarProcess, ingress: SidecarProcess) -> None:
        self.egress = egress
        self.ingress = ingress

    @property
    def lines(self) -> list[str]:
        return self.ingress.lines

    def wait_for_count(self, text: str, count: int, timeout: float = 20) -> None:
        self.ingress.wait_for_count(text, count, timeout)

    def channel(self, pki: Pki, client: str | None = "alice", **_: object) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.egress.port}", options=UNLIMITED)


class SidecarFactory:
    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.started: list[SidecarProcess] = []

    def tls_args(self) -> list[str]:
        return [
            "--cert",
            str(self.pki.cert("server")),
            "--key",
            str(self.pki.key("server")),
            "--ca",
            str(self.pki.dir / "ca.pem"),
        ]

    def start(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        default_tls: bool = True,
        listen: str | None = "127.0.0.1:0",
    ) -> SidecarProcess:
        """Start a sidecar on a free port (with the test server certificate), plus args."""
        tls = self.tls_args() if default_tls else []
        listen_args = ["--listen", listen] if listen else []
        process = SidecarProcess([*listen_args, *tls, *args], env)
        self.started.append(process)
        return process

    def serving(self, upstream_port: int, *args: str, **kwargs: object) -> SidecarProcess:
        """Start a sidecar relaying to upstream_port and wait until it listens."""
        process = self.start("--upstream", f"127.0.0.1:{upstream_port}", *args, **kwargs)  # type: ignore[arg-type]
        process.wait_ready()
        return process

    def egress(
        self,
        remote_port: int,
        *args: str,
        client: str = "alice",
        listen: str = "127.0.0.1:0",
        wait: bool = True,
    ) -> SidecarProcess:
        """Start an egress sidecar to remote_port on 127.0.0.1 and wait until it listens."""
        process = self.start(
            "--mode",
            "egress",
            "--upstream",
            f"127.0.0.1:{remote_port}",
            "--cert",
            str(self.pki.cert(client)),
            "--key",
            str(self.pki.key(client)),
            "--ca",
            str(self.pki.dir / "ca.pem"),
            *args,
            default_tls=False,
            listen=listen,
        )
        if wait:
            process.wait_ready()
        return process

    def chain(self, upstream_port: int, *ingress_args: str) -> Chain:
        """client -> egress (as alice) -> ingress -> upstream_port, both sidecars ready."""
        ingress = self.serving(upstream_port, *(ingress_args or ("--allow-cn", "alice")))
        return Chain(self.egress(ingress.port), ingress)

    def run(
        self, *args: str, timeout: float = 30, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the sidecar command to completion (for start-up errors)."""
        return subprocess.run(
            [sys.executable, "-m", "sidecar", *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def assert_config_error(
    sidecars: SidecarFactory, args: list[str], *expected: str, env: dict[str, str] | None = None
) -> str:
    """Run the sidecar expecting exit 2 with one line on stderr holding every expected text."""
    result = sidecars.run(*args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def sidecars(pki: Pki) -> Iterator[SidecarFactory]:
    factory = SidecarFactory(pki)
    yield factory
    for process in factory.started:
        process.stop()


@pytest.fixture
def sidecar(sidecars: SidecarFactory, probe: Probe) -> SidecarProcess:
    """A sidecar in front of the probe that allows CN alice."""
    return sidecars.serving(probe.port, "--allow-cn", "alice")


DEMO_APP_LISTENING = r"on 127\.0\.0\.1:(?P<port>\d+)"


def start_demo_app(data: Path) -> ChildProcess:
    """The demo app (demo/app.py), plain gRPC on a free loopback port, ready."""
    app = ChildProcess(
        [sys.executable, "-m", "demo.app", "--listen", "127.0.0.1:0", "--data", str(data)]
    )
    try:
        app.wait_ready(DEMO_APP_LISTENING)
    except BaseException:
        app.stop()
        raise
    return app


@pytest.fixture
def demo_app(tmp_path: Path) -> Iterator[ChildProcess]:
    """The demo app, its store in tmp_path."""
    app = start_demo_app(tmp_path / "kv.json")
    yield app
    app.stop()


def run_demo_client(target: str, script: str, prefix: Sequence[str] = ()) -> str:
    """Run the demo client (plaintext, as a legacy client) with `script` on stdin; its output."""
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "demo.client", "--target", target],
        cwd=ROOT,
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
