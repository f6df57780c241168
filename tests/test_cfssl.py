"""The TLS-authentication seed's setup: certificates made by cfssl secure the demo app.

The seed makes its CA, its server certificate (for node.example.com) and its client
certificate with cfssl, and its server adds the gRPC health service. Here those
cfssl certificates (RSA, from Debian's golang-cfssl) serve both sidecars of the
chain, and the app's health service answers through it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.gen import kv_pb2, kv_pb2_grpc
from tests.conftest import ChildProcess, SidecarFactory, install_debian_packages

# On a fresh machine the fixtures first install cfssl: minutes, not the default 120 s.
pytestmark = pytest.mark.timeout(1200)

SERVER_NAMES = ["node04.example.com", "node.example.com"]  # the seed's -hostname
CA_CONFIG = {
    "signing": {
        "default": {"expiry": "8760h"},
        "profiles": {
            "server": {
                "expiry": "8760h",
                "usages": ["signing", "key encipherment", "server auth"],
            },
            "client": {
                "expiry": "8760h",
                "usages": ["signing", "key encipherment", "client auth"],
            },
        },
    }
}


def _csr(common_name: str) -> dict[str, object]:
    return {
        "CN": common_name,
        "key": {"algo": "rsa", "size": 2048},
        "names": [{"O": "Seed", "OU": "SRE"}],
    }


def _cfssl(directory: Path, bare: str, *arguments: str) -> None:
    """`cfssl ARGUMENTS | cfssljson -bare BARE` in directory, failing with cfssl's words."""
    made = subprocess.run(
        ["cfssl", *arguments], cwd=directory, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    split = subprocess.run(
        ["cfssljson", "-bare", bare],
        cwd=directory,
        input=made.stdout,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert split.returncode == 0, split.stderr


@pytest.fixture(scope="module")
def cfssl_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, server.pem/server-key.pem and client.pem/client-key.pem, as the seed makes them."""
    install_debian_packages(["golang-cfssl"], ["cfssl", "cfssljson"])
    directory = tmp_path_factory.mktemp("cfssl")
    for name, content in (
        ("ca-csr.json", _csr("Seed Root CA")),
        ("ca-config.json", CA_CONFIG),
        ("server-csr.json", _csr(SERVER_NAMES[0])),
        ("client-csr.json", _csr("seed-client")),
    ):
        (directory / name).write_text(json.dumps(content))
    _cfssl(directory, "ca", "gencert", "-initca", "ca-csr.json")
    signing = ["gencert", "-ca=ca.pem", "-ca-key=ca-key.pem", "-config=ca-config.json"]
    _cfssl(
        directory,
        "server",
        *signing,
        "-profile=server",
        f"-hostname={','.join(SERVER_NAMES)}",
        "server-csr.json",
    )
    _cfssl(directory, "client", *signing, "-profile=client", "client-csr.json")
    return directory


def test_sidecar_certs_verify_agrees_with_cfssl(
    cfssl_certs: Path, sidecars: SidecarFactory
) -> None:
    ca = str(cfssl_certs / "ca.pem")
    server = sidecars.run(
        "certs", "verify", str(cfssl_certs / "server.pem"), "--ca", ca,
        "--server-name", "node.example.com",
    )  # fmt: skip
    assert server.returncode == 0, server.stdout + server.stderr
    client = sidecars.run(
        "certs", "verify", str(cfssl_certs / "client.pem"), "--ca", ca, "--client"
    )
    assert client.returncode == 0, client.stdout + client.stderr
    # A client certificate cannot serve: cfssl's profile gave it clientAuth only.
    wrong = sidecars.run("certs", "verify", str(cfssl_certs / "client.pem"), "--ca", ca)
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr


def test_cfssl_certificates_secure_the_chain_and_health_answers_through_it(
    cfssl_certs: Path, sidecars: SidecarFactory, demo_app: ChildProcess
) -> None:
    ca = str(cfssl_certs / "ca.pem")
    ingress = sidecars.start(
        "--upstream", f"127.0.0.1:{demo_app.port}", "--cert", str(cfssl_certs / "server.pem"),
        "--key", str(cfssl_certs / "server-key.pem"), "--ca", ca, "--allow-cn", "seed-client",
        default_tls=False,
    )  # fmt: skip
    ingress.wait_ready()
    # The server certificate names node.example.com, not 127.0.0.1: the egress is told
    # which name to expect, as the seed's /etc/hosts entry would arrange.
    egress = sidecars.start(
        "--mode", "egress", "--upstream", f"127.0.0.1:{ingress.port}",
        "--server-name", "node.example.com", "--cert", str(cfssl_certs / "client.pem"),
        "--key", str(cfssl_certs / "client-key.pem"), "--ca", ca,
        default_tls=False,
    )  # fmt: skip
    egress.wait_ready()

    with grpc.insecure_channel(f"127.0.0.1:{egress.port}") as channel:
        checker = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kv.KV"):
            reply = checker.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as unknown:
            checker.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND  # the app's answer, relayed
        store = kv_pb2_grpc.KVStub(channel)
        store.Put(kv_pb2.PutRequest(key="seed", value="cfssl"), timeout=10)
        assert store.Get(kv_pb2.GetRequest(key="seed"), timeout=10).value == "cfssl"

    ingress.wait_for(r"/grpc\.health\.v1\.Health/Check peer='CN=seed-client' .* code=OK")
