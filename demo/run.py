"""`make demo`: a legacy service secured end to end on this machine, then everything stopped.

    demo client --plaintext--> egress sidecar --mTLS--> ingress sidecar --plaintext--> demo app

Makes a CA and certificates with `sidecar certs`, starts the plain demo app, an
ingress sidecar in front of it (allowing only CN=demo-client) and an egress sidecar
for the client, runs a scripted session through the chain, shows a caller that is
not on the allowlist refused, with the ingress's access-log line for an allowed and a
denied call, and stops all it started. `--shell` opens the interactive client on the
chain instead of the script.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

SCRIPT = """\
put colour blue
get colour
put colour green
delete colour
get colour
add 2 40
metrics cpu host=app
"""
_PORT = re.compile(r"(?:listening on|on) 127\.0\.0\.1:(\d+)")
_READY_SECONDS = 30
_ACCESS_SECONDS = 5  # the sidecar writes its access lines every 10 ms


class Child:
    """A process of the demo, its output echoed with a prefix once it is ready."""

    def __init__(self, label: str, args: list[str]) -> None:
        self.label = label
        self.process = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._port: list[int] = []
        self._ready = threading.Event()
        self.access: list[str] = []  # its access-log lines, kept to be shown where they fit
        self._logged = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not self._port and (found := _PORT.search(line)):
                self._port.append(int(found.group(1)))
                self._ready.set()
            if "access:" in line:
                with self._logged:
                    self.access.append(line.rstrip())
                    self._logged.notify_all()
            else:
                print(f"  [{self.label}] {line.rstrip()}", flush=True)
        self._ready.set()

    def access_line(self, after: int, holding: str) -> str:
        """The first access line past the first `after` that holds the text, once logged."""
        with self._logged:
            self._logged.wait_for(
                lambda: any(holding in line for line in self.access[after:]), _ACCESS_SECONDS
            )
            found = [line for line in self.access[after:] if holding in line]
        return found[0] if found else f"(no access line with {holding!r} within {_ACCESS_SECONDS}s)"

    def port(self) -> int:
        if not self._ready.wait(_READY_SECONDS) or not self._port:
            raise SystemExit(f"demo: {self.label} did not start (exit {self.process.poll()})")
        return self._port[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def sidecar(*args: str) -> list[str]:
    return ["sidecar", *args]


def certs(directory: Path) -> None:
    """A CA, the app's server certificate and two client certificates, by `sidecar certs`."""
    ca = directory / "ca"
    commands = [
        ["init-ca", "--out", str(ca), "--name", "Demo Root CA"],
        ["issue", "--ca", str(ca), "--cn", "app", "--server", "--dns", "localhost",
         "--ip", "127.0.0.1", "--out", str(directory)],
        ["issue", "--ca", str(ca), "--cn", "demo-client", "--client", "--out", str(directory)],
        ["issue", "--ca", str(ca), "--cn", "intruder", "--client", "--out", str(directory)],
    ]  # fmt: skip
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "certs", *command], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SystemExit(f"demo: sidecar certs {command[0]} failed: {result.stderr.strip()}")
        print(f"  {result.stdout.strip()}")


@contextlib.contextmanager
def running(children: list[Child]) -> Iterator[None]:
    try:
        yield
    finally:
        for child in reversed(children):
            child.stop()


def egress(label: str, directory: Path, client: str, ingress_port: int) -> Child:
    return Child(
        label,
        sidecar(
            "--mode", "egress", "--listen", "127.0.0.1:0",
            "--upstream", f"127.0.0.1:{ingress_port}", "--server-name", "app",
            "--cert", str(directory / f"{client}.pem"), "--key", str(directory / f"{client}.key"),
            "--ca", str(directory / "ca" / "ca.pem"),
        ),
    )  # fmt: skip


def client(port: int, script: str | None) -> int:
    args = [sys.executable, "-m", "demo.client", "--target", f"127.0.0.1:{port}"]
    if script is None:
        return subprocess.run(args).returncode
    result = subprocess.run(args, input=script, capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines():
        print(f"    {line}")
    return result.returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.run", description=__doc__.split("\n")[0])
    parser.add_argument("--shell", action="store_true", help="open the interactive client")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as temporary:
        directory = Path(temporary)
        print(f"1. certificates, made by `sidecar certs` in {directory}:")
        certs(directory)
        children: list[Child] = []
        with running(children):
            print("\n2. the chain, every process on this machine:")
            app = Child("app", ["demo.app", "--listen", "127.0.0.1:0",
                                "--data", str(directory / "kv.json")])  # fmt: skip
            children.append(app)
            app_port = app.port()
            ingress = Child("ingress", sidecar(
                "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{app_port}",
                "--cert", str(directory / "app.pem"), "--key", str(directory / "app.key"),
                "--ca", str(directory / "ca" / "ca.pem"), "--allow-cn", "demo-client",
            ))  # fmt: skip
            children.append(ingress)
            ingress_port = ingress.port()
            good = egress("egress demo-client", directory, "demo-client", ingress_port)
            bad = egress("egress intruder", directory, "intruder", ingress_port)
            children += [good, bad]
            good_port, bad_port = good.port(), bad.port()
            print(
                f"\n   demo client --plaintext--> 127.0.0.1:{good_port} egress (CN=demo-client)"
                f" --mTLS, server name 'app'--> 127.0.0.1:{ingress_port} ingress (CN=app,"
                f" allows CN=demo-client) --plaintext--> 127.0.0.1:{app_port} app"
            )
            if args.shell:
                print("\n3. the interactive client (type 'help'; 'exit' stops the demo):")
                return client(good_port, None)
            print("\n3. a scripted session through the whole chain:")
            logged = len(ingress.access)
            if client(good_port, SCRIPT) != 0:
                return 1
            print("\n   the ingress's access log, its line for the first call:")
            print(f"    {ingress.access_line(logged, 'code=OK')}")
            print(
                "\n4. a caller whose certificate is valid but not on the allowlist (CN=intruder):"
            )
            logged = len(ingress.access)
            client(bad_port, "get colour\n")
            print("\n   and the ingress's access-log line for it:")
            print(f"    {ingress.access_line(logged, 'code=PERMISSION_DENIED')}")
            print("\n5. stopping everything (SIGTERM: each sidecar drains, then exits)")
    print("demo finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
