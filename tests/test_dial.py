"""`sidecar dial`: each step of a connection reported, and each common failure with its fix.

The five failures a new user meets (the name dialled not in the server's certificate, a
server certificate from an unknown CA, our certificate refused, our certificate not on
the allowlist, the app down), nothing listening, the wrong kind of port, and the usage
errors, each against real sidecars and apps.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, ChildProcess, Pki, SidecarFactory, SidecarProcess

HEALTH = "/grpc.health.v1.Health/Check"


def dial(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "dial", *args],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def tls(pki: Pki, client: str | None = "alice", ca: str = "ca.pem") -> list[str]:
    own = ["--cert", str(pki.cert(client)), "--key", str(pki.key(client))] if client else []
    return [*own, "--ca", str(pki.dir / ca)]


def steps(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[bool, str]]:
    """The report's steps by name: (ok, detail)."""
    report = json.loads(result.stdout)
    return {step["step"]: (step["ok"], step["detail"]) for step in report["steps"]}


def fix(result: subprocess.CompletedProcess[str]) -> str:
    """The text report's last line: the fix."""
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("fix: "), result.stdout
    return last.removeprefix("fix: ")


def closed_port() -> int:
    with socket.socket() as placeholder:  # a port with nothing listening on it
        placeholder.bind(("127.0.0.1", 0))
        port: int = placeholder.getsockname()[1]
    return port


@pytest.fixture
def secured_demo(sidecars: SidecarFactory, demo_app: ChildProcess) -> SidecarProcess:
    """The demo app (it serves grpc.health.v1) behind a sidecar allowing CN=alice."""
    return sidecars.serving(demo_app.port, "--allow-cn", "alice")


def test_every_step_passes_through_a_sidecar_to_an_app_that_is_serving(
    secured_demo: SidecarProcess, pki: Pki
) -> None:
    result = dial(f"localhost:{secured_demo.port}", *tls(pki))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"sidecar dial localhost:{secured_demo.port} (server name localhost)"
    assert lines[-1] == "OK"
    shown = "\n".join(lines)
    for expected in (
        "ok    tcp          connected to 127.0.0.1:",
        "ok    tls          TLSv1.3, ALPN h2",
        "ok    certificate  CN=localhost [DNS:localhost, IP:127.0.0.1, IP:::1] issued by "
        "CN=Test Root CA, valid until",
        f"ok    trust        chains to --ca ({pki.dir / 'ca.pem'})",
        "ok    name         carries localhost",
        "ok    client       the server accepted our certificate CN=alice",
        f"ok    call         {HEALTH}: OK (SERVING)",
    ):
        assert expected in shown, shown


def test_json_report_names_each_step(secured_demo: SidecarProcess, pki: Pki) -> None:
    result = dial(f"127.0.0.1:{secured_demo.port}", *tls(pki), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["fix"] is None
    assert report["server_name"] == "127.0.0.1"
    assert [step["step"] for step in report["steps"]] == [
        "tcp", "tls", "certificate", "trust", "name", "client", "call"
    ]  # fmt: skip
    assert all(step["ok"] for step in report["steps"])


def test_a_name_the_certificate_lacks_names_those_it_carries(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    result = dial(f"127.0.0.1:{sidecar.port}", *tls(pki), "--server-name", "app.internal")
    assert result.returncode == 1
    assert (
        "FAIL  name         the certificate names DNS:localhost, IP:127.0.0.1, IP:::1, not "
        "app.internal"
    ) in result.stdout
    assert fix(result) == (
        "dial localhost, or pass --server-name localhost (or reissue the certificate with "
        "--dns app.internal)"
    )
    assert "call" not in steps(dial(f"127.0.0.1:{sidecar.port}", *tls(pki), "--server-name",
                                    "app.internal", "--json"))  # fmt: skip


def test_a_server_certificate_from_another_ca_names_its_issuer_and_the_bundle(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    result = dial(f"localhost:{sidecar.port}", *tls(pki, ca="other-ca.pem"))
    assert result.returncode == 1
    assert "FAIL  trust        does not chain to --ca: unable to get local issuer" in (
        result.stdout
    )
    assert fix(result) == (
        f"the server's certificate was issued by CN=Test Root CA; --ca "
        f"({pki.dir / 'other-ca.pem'}) holds [CN=Some Other CA]: pass the CA that issued it "
        "(or have the server send its intermediates)"
    )


def test_our_certificate_refused_by_the_server_names_our_issuer(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    result = dial(f"localhost:{sidecar.port}", *tls(pki, "stranger"))
    assert result.returncode == 1
    assert (
        "FAIL  client       the server refused our certificate CN=alice: TLS alert unknown ca"
    ) in result.stdout
    assert fix(result).startswith(
        "the server must trust CN=Some Other CA, which issued ours (its --ca)"
    )
    sidecar.wait_for(r"WARNING .*TLS handshake with ipv4:127\.0\.0\.1:\d+ failed")


def test_no_client_certificate_says_to_pass_one(sidecar: SidecarProcess, pki: Pki) -> None:
    result = dial(f"localhost:{sidecar.port}", *tls(pki, None))
    assert result.returncode == 1
    assert "FAIL  client       the server refused us: TLS alert certificate required" in (
        result.stdout
    )
    assert fix(result) == "the server requires a client certificate: pass --cert and --key"


def test_a_certificate_not_on_the_allowlist_gets_the_sidecars_reason(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    result = dial(f"localhost:{sidecar.port}", *tls(pki, "mallory"))
    assert result.returncode == 1
    assert "ok    client       the server accepted our certificate CN=mallory" in result.stdout
    assert (
        f"FAIL  call         {HEALTH}: PERMISSION_DENIED: peer CN=mallory is not allowed to "
        f"call {HEALTH}"
    ) in result.stdout
    assert fix(result).startswith(
        "the route does not allow our certificate (CN=mallory): allow one of its names there"
    )


def test_the_app_down_behind_the_sidecar_is_named(sidecars: SidecarFactory, pki: Pki) -> None:
    down = closed_port()
    process = sidecars.serving(down, "--allow-cn", "alice")
    result = dial(f"localhost:{process.port}", *tls(pki))
    assert result.returncode == 1
    assert (
        f"FAIL  call         {HEALTH}: UNAVAILABLE: upstream 127.0.0.1:{down} unavailable: "
        "Connection refused"
    ) in result.stdout
    assert fix(result) == (
        "the sidecar is up but the app behind it is not: start the app, or fix the sidecar's "
        "--upstream"
    )


def test_an_app_without_a_health_service_is_reached_all_the_same(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    """The probe app has no grpc.health.v1: the default call reaching it is a success."""
    result = dial(f"localhost:{sidecar.port}", *tls(pki))
    assert result.returncode == 0, result.stdout
    assert f"ok    call         {HEALTH}: UNIMPLEMENTED" in result.stdout
    assert "pass --method to call one of its own" in result.stdout


def test_a_method_of_the_app_is_called_with_an_empty_message(
    sidecar: SidecarProcess, pki: Pki
) -> None:
    result = dial(f"localhost:{sidecar.port}", *tls(pki), "--method", "/probe.Probe/Unary")
    assert result.returncode == 0, result.stdout
    assert "ok    call         /probe.Probe/Unary: OK" in result.stdout


def test_nothing_listening_is_said_in_the_first_step() -> None:
    port = closed_port()
    result = dial(f"127.0.0.1:{port}", "--plaintext")
    assert result.returncode == 1
    assert f"FAIL  tcp          connection refused: nothing listens on 127.0.0.1:{port}" in (
        result.stdout
    )
    assert fix(result) == "start the sidecar (or the server), or dial the port it listens on"


def test_plaintext_checks_the_app_behind_the_sidecar(demo_app: ChildProcess) -> None:
    result = dial(f"127.0.0.1:{demo_app.port}", "--plaintext")
    assert result.returncode == 0, result.stdout
    assert "ok    http2        speaks HTTP/2 without TLS" in result.stdout
    assert f"ok    call         {HEALTH}: OK (SERVING)" in result.stdout


def test_plaintext_against_the_sidecar_says_it_expects_tls(sidecar: SidecarProcess) -> None:
    result = dial(f"127.0.0.1:{sidecar.port}", "--plaintext")
    assert result.returncode == 1
    assert "FAIL  http2        no HTTP/2 answer: it closed the connection" in result.stdout
    assert fix(result) == (
        "a TLS port closes on a plaintext preface: drop --plaintext and pass --cert, --key and "
        "--ca (or dial the plaintext server's port)"
    )


def test_tls_against_a_plaintext_app_says_it_does_not_speak_tls(
    demo_app: ChildProcess, pki: Pki
) -> None:
    result = dial(f"127.0.0.1:{demo_app.port}", *tls(pki))
    assert result.returncode == 1
    assert "FAIL  tls          the server does not speak TLS" in result.stdout
    assert fix(result) == (
        f"127.0.0.1:{demo_app.port} looks like a plaintext port: check it with --plaintext, or "
        "dial the sidecar's port"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["localhost"], "HOST:PORT: expected HOST:PORT", id="no-port"),
        pytest.param(["localhost:1"], "--ca: give the CA bundle", id="no-ca"),
        pytest.param(["localhost:1", "--plaintext", "--cert", "c.pem"], "--plaintext: --cert",
                     id="plaintext-with-tls-flags"),
        pytest.param(["localhost:1", "--ca", "/nonexistent.pem"], "--ca: no such file",
                     id="unreadable-ca"),
        pytest.param(["localhost:1", "--plaintext", "--method", "Check"], "--method: expected",
                     id="bad-method"),
        pytest.param(["localhost:1", "--plaintext", "--bogus"], "unrecognized arguments",
                     id="unknown-flag"),
        pytest.param(["a..b:1", "--plaintext"], "HOST:PORT: a..b is not a valid host name",
                     id="not-a-host-name"),
        pytest.param(["localhost:1", "--plaintext", "--timeout", "1e10"],
                     "--timeout: must be a number of seconds above 0 and at most 3600",
                     id="timeout-too-long"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = dial(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


def test_a_key_not_of_the_certificate_is_a_usage_error(pki: Pki) -> None:
    result = dial("localhost:1", "--cert", str(pki.cert("alice")), "--key",
                  str(pki.key("mallory")), "--ca", str(pki.dir / "ca.pem"))  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"sidecar dial: --key {pki.key('mallory')} is not the key of --cert {pki.cert('alice')}"
    )


def test_a_ca_bundle_with_text_around_its_certificates_is_read(
    sidecar: SidecarProcess, pki: Pki, tmp_path: Path
) -> None:
    """Bundles such as certifi's carry comments, some not ASCII, between the certificates."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# Főtanúsítvány\n".encode() + (pki.dir / "ca.pem").read_bytes())
    result = dial(f"localhost:{sidecar.port}", *tls(pki)[:4], "--ca", str(bundle))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok    trust        chains to --ca ({bundle})" in result.stdout
