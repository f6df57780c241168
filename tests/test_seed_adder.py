"""The securing-gRPC tutorial's matrix, on its asyncio Adder, with the sidecar doing the securing.

The tutorial's Adder stays unsecured (the demo app); the sidecar in front of it
gives the mutual-TLS mode. Its test script's cases: the right client (reaching the
server by name through the SNI override), no client certificate, a certificate
from another CA, a client name that is not allowed, a key that is not the
certificate's, and a wrong server name. The last two are refused by the client
itself, before the sidecar sees anything; they are here because the tutorial
checks them. The server certificate names adder.internal only, so the override
must really take effect for the right client to get through.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc import aio

from demo.gen import adder_pb2, adder_pb2_grpc
from sidecar import certs
from tests.conftest import ChildProcess, Pki, SidecarFactory, SidecarProcess

SERVER_NAME = "adder.internal"
ADD_OK = r"/adder\.Adder/Add peer='CN=alice' .* code=OK"


@pytest.fixture(scope="module")
def adder_server_cert(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("adder")
    certs.issue(pki.ca, SERVER_NAME, usage="server").write(directory, "server")
    return directory


@pytest.fixture
def ingress(
    pki: Pki, sidecars: SidecarFactory, demo_app: ChildProcess, adder_server_cert: Path
) -> SidecarProcess:
    process = sidecars.start(
        "--upstream", f"127.0.0.1:{demo_app.port}", "--allow-cn", "alice",
        "--cert", str(adder_server_cert / "server.pem"),
        "--key", str(adder_server_cert / "server.key"), "--ca", str(pki.dir / "ca.pem"),
        default_tls=False,
    )  # fmt: skip
    process.wait_ready()
    return process


async def add(port: int, credentials: grpc.ChannelCredentials, server_name: str | None) -> int:
    """2 + 40 through the sidecar with grpc.aio, as the tutorial's client does."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    async with aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        reply = await adder_pb2_grpc.AdderStub(channel).Add(
            adder_pb2.AddRequest(a=2, b=40), timeout=10
        )
        return int(reply.sum)


def test_allowed_client_reaches_the_adder_by_name(pki: Pki, ingress: SidecarProcess) -> None:
    assert asyncio.run(add(ingress.port, pki.client_credentials("alice"), SERVER_NAME)) == 42
    ingress.wait_for(ADD_OK)


@pytest.mark.parametrize(
    ("client", "key_of", "server_name", "expected", "details"),
    [
        pytest.param(
            # grpc core's words for the TLS alert the sidecar sends (it logs the alert's
            # name, certificate required or unknown CA, on stderr)
            None, None, SERVER_NAME, grpc.StatusCode.UNAVAILABLE, "TSI_DATA_CORRUPTED",
            id="no-client-certificate",
        ),
        pytest.param(
            "stranger", None, SERVER_NAME, grpc.StatusCode.UNAVAILABLE, "TSI_DATA_CORRUPTED",
            id="certificate-from-another-ca",
        ),
        pytest.param(
            "mallory", None, SERVER_NAME, grpc.StatusCode.PERMISSION_DENIED,
            "peer CN=mallory is not allowed to call /adder.Adder/Add",
            id="client-name-not-allowed",
        ),
        pytest.param(
            "alice", "mallory", SERVER_NAME, grpc.StatusCode.UNAVAILABLE,
            "Failed to create security handshaker", id="wrong-key-refused-by-the-client",
        ),
        pytest.param(
            "alice", None, "other.example.com", grpc.StatusCode.UNAVAILABLE,
            "Hostname Verification Check failed", id="wrong-server-name-refused-by-the-client",
        ),
        pytest.param(
            "alice", None, None, grpc.StatusCode.UNAVAILABLE,
            "Hostname Verification Check failed", id="no-override-127.0.0.1-is-not-a-name-it-has",
        ),
    ],
)  # fmt: skip
def test_refused(
    pki: Pki,
    ingress: SidecarProcess,
    client: str | None,
    key_of: str | None,
    server_name: str | None,
    expected: grpc.StatusCode,
    details: str,
) -> None:
    credentials = pki.client_credentials(client, key_of=key_of)
    with pytest.raises(aio.AioRpcError) as refused:
        asyncio.run(add(ingress.port, credentials, server_name))
    assert refused.value.code() == expected
    assert details in (refused.value.details() or ""), refused.value.details()
    # The sidecar goes on serving the allowed client, and only its call reached the app.
    assert asyncio.run(add(ingress.port, pki.client_credentials("alice"), SERVER_NAME)) == 42
    ingress.wait_for(ADD_OK)
    reached = [line for line in ingress.lines if "/adder.Adder/Add" in line and "code=OK" in line]
    assert len(reached) == 1, reached
