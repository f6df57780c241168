"""A SPIFFE Workload API server for tests, on a unix socket, as a SPIRE agent serves it.

It implements the streaming FetchX509SVID of the Workload API (with the stubs the
`spiffe` package ships), requires the `workload.spiffe.io: true` header as agents do,
and pushes what the test gives it: each `push` goes to every open stream, and a new
stream starts with the latest.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc

from sidecar import certs

_DER = serialization.Encoding.DER


def svid_response(
    leaf: certs.Issued,
    spiffe_id: str,
    bundle: list[certs.Issued],
    federated: dict[str, certs.Issued] | None = None,
) -> workload_pb2.X509SVIDResponse:
    """One X509SVIDResponse: the SVID (the leaf and its key), its trust domain's bundle, and
    the bundles of federated trust domains (by trust domain: spiffe://partner.org)."""
    key = leaf.key.private_bytes(
        _DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    svid = workload_pb2.X509SVID(
        spiffe_id=spiffe_id,
        x509_svid=leaf.certificate.public_bytes(_DER),
        x509_svid_key=key,
        bundle=b"".join(ca.certificate.public_bytes(_DER) for ca in bundle),
    )
    others = {domain: ca.certificate.public_bytes(_DER) for domain, ca in (federated or {}).items()}
    return workload_pb2.X509SVIDResponse(svids=[svid], federated_bundles=others)


class FakeAgent(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(self, socket: Path) -> None:
        self.address = f"unix:{socket}"
        self._latest: workload_pb2.X509SVIDResponse | None = None
        self._streams: list[queue.Queue[workload_pb2.X509SVIDResponse]] = []
        self._lock = threading.Lock()
        self.streams_opened = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, self._server)
        self._server.add_insecure_port(self.address)

    def start(self) -> FakeAgent:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(None).wait()

    def push(self, response: workload_pb2.X509SVIDResponse) -> None:
        with self._lock:
            self._latest = response
            for stream in self._streams:
                stream.put(response)

    def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: grpc.ServicerContext
    ) -> Iterator[workload_pb2.X509SVIDResponse]:
        if ("workload.spiffe.io", "true") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        updates: queue.Queue[workload_pb2.X509SVIDResponse] = queue.Queue()
        with self._lock:
            self.streams_opened += 1
            if self._latest is not None:
                updates.put(self._latest)
            self._streams.append(updates)
        try:
            while context.is_active():
                try:
                    yield updates.get(timeout=0.1)
                except queue.Empty:
                    continue
        finally:
            with self._lock:
                self._streams.remove(updates)
