"""The securing-gRPC tutorial's matrix, on its asyncio Adder, with the sidecar doing the securing.

The tutorial's Adder stays unsecured (the demo app); the sidecar in front of it
gives the mutual-TLS mode. Its test script's cases: the right client, no client
certificate, a key that is not the certificate's, a certificate from another CA,
a client name that is not allowed, and the server-name (SNI) override, right and wrong.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio

from demo.gen import adder_pb2, adder_pb2_grpc
from tests.conftest import ChildProcess, Pki, SidecarFactory


async def add(port: int, credentials: grpc.ChannelCredentials, server_name: str | None) -> int:
    """2 + 40 through the sidecar with grpc.aio, as the tutorial's client does."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    async with aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        reply = await adder_pb2_grpc.AdderStub(channel).Add(
            adder_pb2.AddRequest(a=2, b=40), timeout=10
        )
        return int(reply.sum)


@pytest.mark.parametrize(
    ("client", "key_of", "server_name", "expected", "reason"),
    [
        pytest.param("alice", None, None, grpc.StatusCode.OK, "", id="allowed-client"),
        pytest.param("alice", None, "localhost", grpc.StatusCode.OK, "", id="server-name-override"),
        pytest.param(None, None, None, grpc.StatusCode.UNAVAILABLE, "", id="no-client-certificate"),
        pytest.param("alice", "mallory", None, grpc.StatusCode.UNAVAILABLE, "", id="wrong-key"),
        pytest.param("stranger", None, None, grpc.StatusCode.UNAVAILABLE, "", id="wrong-ca"),
        pytest.param(
            "mallory",
            None,
            None,
            grpc.StatusCode.PERMISSION_DENIED,
            "peer CN=mallory is not allowed to call /adder.Adder/Add",
            id="client-name-not-allowed",
        ),
        pytest.param(
            "alice",
            None,
            "other.example.com",
            grpc.StatusCode.UNAVAILABLE,
            "",
            id="wrong-server-name",
        ),
    ],
)
def test_adder_matrix(
    pki: Pki,
    sidecars: SidecarFactory,
    demo_app: ChildProcess,
    client: str | None,
    key_of: str | None,
    server_name: str | None,
    expected: grpc.StatusCode,
    reason: str,
) -> None:
    ingress = sidecars.serving(demo_app.port, "--allow-cn", "alice")
    credentials = pki.client_credentials(client, key_of=key_of)
    if expected == grpc.StatusCode.OK:
        assert asyncio.run(add(ingress.port, credentials, server_name)) == 42
        ingress.wait_for(r"/adder\.Adder/Add peer='CN=alice' .* code=OK")
        return
    with pytest.raises(aio.AioRpcError) as refused:
        asyncio.run(add(ingress.port, credentials, server_name))
    assert refused.value.code() == expected
    assert reason in (refused.value.details() or "")
    # Whatever one caller got, the sidecar goes on serving the allowed one.
    assert asyncio.run(add(ingress.port, pki.client_credentials("alice"), None)) == 42
