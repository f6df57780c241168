"""Cross-language, as the Go/Python seed: grpc-go on both sides of the sidecar.

A Go client (tests/go/crosslang.go, grpc-go from Debian's packages) calls the
Python demo app through the ingress sidecar; the Python demo client reaches a Go
server that requires and verifies client certificates through the egress sidecar.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench import toolchain
from tests.conftest import (
    ROOT,
    ChildProcess,
    Pki,
    SidecarFactory,
    make_crl,
    run_demo_client,
)

# On a fresh machine the fixtures first install Go and build the program: minutes, not
# the default 120 s.
pytestmark = pytest.mark.timeout(1200)

GO_SOURCE = Path(__file__).parent / "go" / "crosslang.go"
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture(scope="module")
def crosslang(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go program, built from tests/go/crosslang.go and Go code generated from protos/."""
    try:
        return toolchain.build_go_program(
            GO_SOURCE,
            sorted((ROOT / "protos").glob("*.proto")),
            tmp_path_factory.mktemp("gopath"),
            "sidecar.demo",
        )
    except toolchain.ToolchainError as error:
        pytest.fail(str(error))


@pytest.fixture
def go_server(crosslang: Path, pki: Pki) -> Iterator[ChildProcess]:
    """The Go server: TLS with the test server certificate, client certificates required."""
    server = ChildProcess(
        [str(crosslang), "server", "-listen", "127.0.0.1:0", "-ca", str(pki.dir / "ca.pem"),
         "-cert", str(pki.cert("server")), "-key", str(pki.key("server"))]
    )  # fmt: skip
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def go_client(crosslang: Path, pki: Pki, port: int, client: str) -> dict[str, Any]:
    """Run the Go client against 127.0.0.1:port as `client`; its report, call by call."""
    result = subprocess.run(
        [str(crosslang), "client", "-target", f"127.0.0.1:{port}", "-server-name", "localhost",
         "-ca", str(pki.dir / "ca.pem"), "-cert", str(pki.cert(client)),
         "-key", str(pki.key(client))],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_go_client_calls_the_python_app_through_the_ingress(
    crosslang: Path, pki: Pki, sidecars: SidecarFactory, demo_app: ChildProcess
) -> None:
    ingress = sidecars.serving(demo_app.port, "--allow-cn", "alice")
    report = go_client(crosslang, pki, ingress.port, "alice")
    assert report["put"] == {"code": 0, "message": "", "reply": {"previous": None}}
    assert report["get"] == {"code": 0, "message": "", "reply": "go"}
    assert report["delete"] == {"code": 0, "message": "", "reply": {"previous": "go"}}
    assert report["get_missing"] == {"code": NOT_FOUND, "message": "no key 'language'"}
    assert report["add"] == {"code": 0, "message": "", "reply": 42}
    assert report["metrics"]["code"] == 0, report["metrics"]
    samples = report["metrics"]["reply"]
    assert len(samples) == 3  # start, start + 1 min, end: the Python app's one a minute
    assert {sample["name"] for sample in samples} == {"cpu"}
    assert all(sample["labels"] == {"host": "app", "lang": "go"} for sample in samples)
    # The access log names the Go client's certificate as the caller of each call.
    ingress.wait_for(r"/api\.Metrics/Query peer='CN=alice'.* code=OK")


def test_go_client_off_the_allowlist_is_refused_with_the_reason(
    crosslang: Path, pki: Pki, sidecars: SidecarFactory, demo_app: ChildProcess
) -> None:
    ingress = sidecars.serving(demo_app.port, "--allow-cn", "alice")
    report = go_client(crosslang, pki, ingress.port, "mallory")
    assert set(report) == {"put", "get", "delete", "get_missing", "add", "metrics"}
    for call, outcome in report.items():
        assert outcome["code"] == PERMISSION_DENIED, (call, outcome)
        assert "CN=mallory" in outcome["message"], (call, outcome)
        assert "reply" not in outcome


def test_python_client_reaches_the_go_server_through_the_egress(
    pki: Pki, sidecars: SidecarFactory, go_server: ChildProcess
) -> None:
    # The Go server really insists on a client certificate: without one, it refuses
    # the connection with an alert (bad_certificate, from Go 1.19).
    context = ssl.create_default_context(cafile=pki.dir / "ca.pem")
    with (
        socket.create_connection(("127.0.0.1", go_server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as bare,
        pytest.raises(ssl.SSLError, match=r"ALERT_BAD_CERTIFICATE|CERTIFICATE_REQUIRED"),
    ):
        bare.recv(1)

    egress = sidecars.egress(go_server.port, client="alice")
    output = run_demo_client(
        f"127.0.0.1:{egress.port}",
        "put language python\nget language\nput language go\ndelete language\n"
        "get language\nadd 2 40\nmetrics cpu host=app\nexit\n",
    )
    assert output.splitlines()[:12] == [
        "> put language python",
        "ok (previous: none)",
        "> get language",
        "python",
        "> put language go",
        "ok (previous: 'python')",
        "> delete language",
        "ok (previous: 'go')",
        "> get language",
        'error: NOT_FOUND: no key "language"',  # the Go server's message, through unchanged
        "> add 2 40",
        "42",
    ]
    # The Go server saw the egress route's certificate as the verified caller.
    assert "cpu{caller=alice,host=app,served_by=go}" in output


def test_egress_explains_a_go_server_refusing_its_certificate(
    pki: Pki, sidecars: SidecarFactory, go_server: ChildProcess
) -> None:
    # "stranger" is issued by another CA. Under TLS 1.3 the Go server refuses it with
    # an alert after the egress finished its side of the handshake.
    egress = sidecars.egress(go_server.port, client="stranger")
    run_demo_client(f"127.0.0.1:{egress.port}", "add 2 40\nexit\n")
    # The first failed call waits only briefly for the diagnosis; once logged, the
    # reason is kept for the calls that follow.
    egress.wait_for("WARNING sidecar.egress: remote 127.0.0.1:.*refused this route's client")
    output = run_demo_client(f"127.0.0.1:{egress.port}", "add 2 40\nexit\n")
    assert "error: UNAVAILABLE: " in output, output
    assert "the remote refused this route's client certificate CN=alice" in output, output
    assert "TLS alert bad certificate" in output, output


# The Go client's calls, on one connection: put, get, delete, get_missing (a Get), add, metrics.
_GO_RULES = [
    {"name": "kv-writes", "action": "allow", "cn": ["alice"],
     "methods": ["/kv.KV/Get", "/kv.KV/Put"]},
    {"name": "no-delete", "action": "deny", "cn": ["alice"], "methods": ["/kv.KV/Delete"],
     "mode": "audit"},
    {"name": "no-metrics", "action": "deny", "any": True, "methods": ["/api.Metrics/*"]},
    {"name": "adding", "action": "allow", "any": True, "methods": ["/adder.Adder/Add"]},
]  # fmt: skip


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_go_client_calls_are_decided_per_method_on_one_connection(
    crosslang: Path,
    pki: Pki,
    sidecars: SidecarFactory,
    demo_app: ChildProcess,
    tmp_path: Path,
    data_plane: str,
) -> None:
    """grpc-go in the policy matrix: allowed, denied and audited calls interleave on the
    Go client's one connection; a caller revoked by the CRL gets nothing through."""
    crl = tmp_path / "ca.crl"
    mallory = x509.load_pem_x509_certificate(pki.cert("mallory").read_bytes()).serial_number
    crl.write_bytes(make_crl(pki.ca, [mallory]).public_bytes(serialization.Encoding.PEM))
    config = tmp_path / "sidecar.yaml"
    route = {
        "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{demo_app.port}",
        "cert": str(pki.cert("server")), "key": str(pki.key("server")),
        "ca": str(pki.dir / "ca.pem"), "rules": _GO_RULES, "crl": str(crl),
        "allow_cn": ["mallory"], "data_plane": data_plane,
    }  # fmt: skip
    config.write_text(yaml.safe_dump(route))
    ingress = sidecars.start("--config", str(config), default_tls=False, listen=None)
    ingress.wait_ready()

    alice = go_client(crosslang, pki, ingress.port, "alice")
    codes = {call: outcome["code"] for call, outcome in alice.items()}
    assert codes == {"put": 0, "get": 0, "delete": 0, "get_missing": NOT_FOUND, "add": 0,
                     "metrics": PERMISSION_DENIED}, alice  # fmt: skip
    assert alice["metrics"]["message"] == (
        "peer CN=alice is not allowed to call /api.Metrics/Query (rule 'no-metrics')"
    )
    ingress.wait_for(r"WARNING .*audit: would deny: peer CN=alice is not allowed to call "
                     r"/kv\.KV/Delete \(rule 'no-delete'\)")  # fmt: skip

    carol = go_client(crosslang, pki, ingress.port, "carol")
    assert carol["add"]["code"] == 0, carol
    for call in ("put", "get", "delete", "get_missing"):
        assert carol[call]["code"] == PERMISSION_DENIED, (call, carol[call])
        assert carol[call]["message"].endswith("(no rule matched)"), carol[call]

    revoked = go_client(crosslang, pki, ingress.port, "mallory")  # on the allowlist, revoked
    for call, outcome in revoked.items():
        assert outcome["code"] == PERMISSION_DENIED, (call, outcome)
        assert f"certificate serial {mallory:x} is revoked (crl ca.crl)" in outcome["message"]
