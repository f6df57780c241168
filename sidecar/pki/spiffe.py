"""Credentials from a SPIFFE Workload API (a SPIRE agent's socket): the route's X.509-SVID
and trust bundle, fetched at start and followed as the agent pushes new ones.

The client is the maintained `spiffe` package (py-spiffe): its WorkloadApiClient
speaks the API (the `workload.spiffe.io` header, the FetchX509SVID stream, the DER
chain, key and bundles) and calls back on a thread of its own; the callbacks are
handed to the event loop, where each update is checked with the start-up checks of
a certificate file (pki/tls.py) and swapped in for new handshakes, or refused with
one ERROR while the last good SVID serves on. Only the bundle of the SVID's own
trust domain is trusted: federated bundles are not used (see _check).

The package is imported only when a route names a socket: it costs ~0.1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from sidecar.config.pem import PemSource
from sidecar.errors import ConfigError, StartupError
from sidecar.observe.loglimit import LogLimiter
from sidecar.pki.credentials import Credentials, SwappedCredentials
from sidecar.pki.tls import check_tls_material
from sidecar.pki.x509 import Role, pem_bundle

if TYPE_CHECKING:
    from spiffe import WorkloadApiClient
    from spiffe.workloadapi.workload_api_client import StreamCancelHandler
    from spiffe.workloadapi.x509_context import X509Context

logger = logging.getLogger("sidecar.server")
# An agent that keeps sending what cannot be used (or keeps failing the stream) is told
# about a few times a minute, not at every update: the last good SVID serves meanwhile.
_faults = LogLimiter(logger, burst=3, period=60.0)

# How long the start-up waits for the agent's first SVID (its socket may appear after
# the sidecar starts, as in a pod whose agent comes up alongside it).
FIRST_SVID_SECONDS = 30.0
_FETCH_TIMEOUT_SECONDS = 5.0
# How long after the stream failed for good (an update the package could not parse, an
# agent answering INVALID_ARGUMENT) it is opened again: doubling from the first to the
# last while it keeps failing. A broken connection is retried by the package itself.
_RESTART_SECONDS = 5.0
_RESTART_MAX_SECONDS = 300.0


class SpiffeSource(SwappedCredentials):
    """A route's credentials as the SPIFFE Workload API at `socket` (unix:PATH) gives them."""

    def __init__(self, socket: str, role: Role, setting: str) -> None:
        self.role = role
        self._socket = socket
        self._setting = setting  # how errors name it: `--spiffe-socket`, `SPIFFE_ENDPOINT_SOCKET`
        self._client: WorkloadApiClient | None = None
        self._stream: StreamCancelHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._restart_delay = _RESTART_SECONDS
        self._current = self._first()

    def _first(self) -> Credentials:
        """The agent's first SVID, waited for (up to FIRST_SVID_SECONDS); a StartupError
        naming the socket and the last failure when none comes, a ConfigError when the
        one that comes fails the checks."""
        from spiffe import WorkloadApiClient
        from spiffe.errors import PySpiffeError

        deadline = time.monotonic() + FIRST_SVID_SECONDS
        while True:
            try:
                if self._client is None:
                    self._client = WorkloadApiClient(socket_path=self._socket)
                context = self._client.fetch_x509_context(timeout=_FETCH_TIMEOUT_SECONDS)
            except PySpiffeError as error:
                if time.monotonic() > deadline:
                    raise StartupError(
                        f"{self._setting} {self._socket}: no X.509-SVID from the SPIFFE "
                        f"Workload API within {FIRST_SVID_SECONDS:g}s: {error}"
                    ) from None
                time.sleep(0.5)
                continue
            return self._check(context)

    def _check(self, context: X509Context) -> Credentials:
        """The update as credentials, checked as a certificate file is (ConfigError)."""
        svid = context.default_svid
        if svid is None:
            raise ConfigError(f"{self._setting} {self._socket}: the agent sent no X.509-SVID")
        chain = pem_bundle(svid.cert_chain)
        key = svid.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Only the SVID's own trust domain's bundle: one CA pool for every bundle would let
        # a federated domain's CA vouch for names of this one (a partner's CA signing
        # spiffe://example.org/...), since the allowlist and the egress name check do not
        # ask which bundle a chain ended in. In a stable order, so that an update that
        # changes nothing compares equal.
        own = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        if own is None or not own.x509_authorities:
            raise ConfigError(
                f"{self._setting} {self._socket}: no trust bundle for the SVID's trust domain "
                f"{svid.spiffe_id.trust_domain}"
            )
        authorities = sorted(
            own.x509_authorities, key=lambda cert: cert.public_bytes(serialization.Encoding.DER)
        )
        bundle = pem_bundle(authorities)
        where = f"{self._setting} ({svid.spiffe_id})"
        cert = PemSource(f"{where} X.509-SVID", inline=chain)
        material = check_tls_material(
            cert,
            PemSource(f"{where} key", inline=key),
            PemSource(f"{where} trust bundle", inline=bundle),
            self.role,
            (chain, key, bundle),
        )
        return Credentials.checked(material, self.role, cert)

    def watch(self) -> None:
        """Follow the agent's updates (SVID rotations, new bundles) from now on."""
        self._loop = asyncio.get_running_loop()
        self._open_stream()

    def _open_stream(self) -> None:
        self._restart = None
        assert self._client is not None and self._loop is not None
        loop = self._loop

        # Called on the package's thread: each hands its news to the loop (unless the loop
        # has closed meanwhile: then there is no one left to tell).
        def updated(context: X509Context) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._updated, context)

        def failed(error: Exception) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._stream_failed, error)

        self._stream = self._client.stream_x509_contexts(updated, failed, retry_connect=True)

    def _updated(self, context: X509Context) -> None:
        """An update from the agent (in the loop): swapped in, or refused with one ERROR."""
        try:
            loaded = self._check(context)
        except ConfigError as error:
            _faults.log(
                logging.ERROR,
                ("refused", self._socket, str(error)),
                "SPIFFE update not used, the current SVID stays: %s",
                error,
            )
            return
        self._restart_delay = _RESTART_SECONDS  # the stream works
        if self._swap(loaded) and self.on_change is not None:
            self.on_change()

    def _stream_failed(self, error: Exception) -> None:
        """The package gave up on the stream (it retries lost connections itself): open it
        again after a pause, keeping the current SVID meanwhile."""
        if self._loop is None or self._restart is not None:
            return  # closed, or a restart is already planned
        delay = self._restart_delay
        self._restart_delay = min(delay * 2, _RESTART_MAX_SECONDS)
        _faults.log(
            logging.WARNING,
            ("stream", self._socket),
            "SPIFFE Workload API %s: the update stream failed (%s); the current SVID stays, "
            "and the stream is opened again in %gs",
            self._socket,
            error,
            delay,
        )
        self._restart = self._loop.call_later(delay, self._open_stream)

    def close(self) -> None:
        self._loop = None
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        if self._client is not None:
            self._client.close()
            self._client = None
