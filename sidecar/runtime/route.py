"""One route: a listener, its credentials and allowlist, the relay and the upstream it feeds.

Ingress: an mTLS listener that requires a client certificate, the allowlist, and
a plaintext upstream on loopback. Egress: a plaintext listener on loopback, no
allowlist (local callers are trusted as the app itself), and an upstream that
speaks mTLS with this route's client certificate.

Two data planes relay the calls: `front` (the default: each caller connection
spliced frame by frame to its own upstream connection) and `relay` (each call
relayed through grpc.aio, chosen with data_plane: grpc).
"""

from __future__ import annotations

import logging
import time

from grpc import aio

from sidecar.auth.policy import AllowRules, Policy
from sidecar.config.limits import Limits
from sidecar.config.model import RouteConfig
from sidecar.errors import StartupError
from sidecar.grpcplane.relay import Relay
from sidecar.grpcplane.upstream import Upstream
from sidecar.pki.diagnosis import TLSDiagnosis
from sidecar.pki.tls import (
    Role,
    ServerCredentialStore,
    channel_credentials,
    client_ssl_context,
    load_tls_material,
    server_ssl_context,
)
from sidecar.splice.listener import Front

logger = logging.getLogger("sidecar.server")

# A drain on the per-call plane first waits for calls to stop arriving for this long
# (at most _SETTLE_LIMIT_SECONDS): grpc core cancels, at its shutdown, the calls it
# has accepted but not yet handed to the relay (see Relay.settle). Handing one over
# takes a completion-queue round trip: well under a millisecond on an idle machine,
# tens of milliseconds with both cores saturated.
_SETTLE_QUIET_SECONDS = 0.25
_SETTLE_LIMIT_SECONDS = 1.0

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # A second instance on the same port would silently take half the connections.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Long-lived idle streams: accept clients' keepalive pings (even without calls)
    # instead of answering them with GOAWAY too_many_pings, and ping idle clients
    # ourselves so a vanished peer is noticed. No idle timeout: an idle stream stays.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


def _core_budgets(limits: Limits) -> tuple[tuple[str, int], ...]:
    """The route's budgets that grpc core's server honours (config.py refuses the others on
    this plane). Core checks channel argument names against nothing: these are the names
    its headers define (GRPC_ARG_*), and tests/test_grpc_plane.py checks they take effect."""
    budgets: tuple[tuple[str, int], ...] = (
        ("grpc.max_metadata_size", limits.max_header_list_size),
        ("grpc.absolute_max_metadata_size", limits.max_header_list_size),
        ("grpc.server_handshake_timeout_ms", max(1, round(limits.handshake_timeout * 1000))),
    )
    if limits.idle_timeout:
        budgets += (("grpc.max_connection_idle_ms", max(1, round(limits.idle_timeout * 1000))),)
    return budgets


class Route:
    """A listener relaying to one upstream, with an explicit lifecycle."""

    def __init__(self, config: RouteConfig) -> None:
        self.config = config
        # Read and validate certificates first: a bad file is a ConfigError before
        # anything is bound.
        role: Role = "server" if config.mode == "ingress" else "client"
        self.material = load_tls_material(config.cert, config.key, config.ca, role)
        self._server_credentials = (
            ServerCredentialStore(self.material) if config.mode == "ingress" else None
        )
        self._server: aio.Server | None = None
        self._front: Front | None = None
        self._upstream: Upstream | None = None
        self._relay: Relay | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Bind the listener and start serving; grpc objects are made inside the running loop."""
        if self.config.data_plane == "splice":
            await self._start_front()
        else:
            await self._start_relay()
        self._log_listening()

    def _diagnosis(self) -> TLSDiagnosis:
        config = self.config
        return TLSDiagnosis(
            config.upstream,
            config.tls_name,
            self.material,
            server_name_setting=config.label("server_name"),
            ca_setting=config.label("ca"),
            cert_setting=config.label("cert"),
        )

    async def _start_front(self) -> None:
        config = self.config
        if config.mode == "ingress":
            self._front = Front(config, server_ssl_context(self.material), Policy(config.allow))
        else:
            self._front = Front(
                config,
                None,
                None,
                upstream_tls=client_ssl_context(self.material),
                diagnosis=self._diagnosis(),
            )
        self.port = await self._front.start()

    async def _start_relay(self) -> None:
        config = self.config
        if self._server_credentials is not None:
            self._upstream = Upstream(config.upstream)
            self._relay = Relay(self._upstream, Policy(config.allow), route=config.name)
        else:
            self._upstream = Upstream(
                config.upstream,
                channel_credentials(self.material),
                config.tls_name,
                self._diagnosis(),
            )
            self._relay = Relay(self._upstream, None, route=config.name)
        self._server = aio.server(
            handlers=[self._relay], options=SERVER_OPTIONS + _core_budgets(config.limits)
        )
        listen = config.listen
        try:
            if self._server_credentials is not None:
                credentials = self._server_credentials.server_credentials()
                self.port = self._server.add_secure_port(listen.target, credentials)
            else:
                self.port = self._server.add_insecure_port(listen.target)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {listen}: {exc} (address in use?)") from None
        await self._server.start()

    def _log_listening(self) -> None:
        config = self.config
        listen = config.listen
        where = listen.target if listen.unix_path else f"{listen.host}:{self.port}"
        if config.mode == "ingress":
            logger.info(
                "%s listening on %s (mTLS, client certificate required), relaying to %s; %s",
                config.title,
                where,
                config.upstream,
                _describe_rules(config.allow),
            )
        else:
            logger.info(
                "%s listening on %s (plaintext, local callers), relaying over mTLS to %s "
                "as %s, expecting server name %r",
                config.title,
                where,
                config.upstream,
                self.material.leaf.subject.rfc4514_string(),
                config.tls_name,
            )

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, let in-flight calls finish for up to grace seconds, then cancel them."""
        if self._front is not None:
            await self._front.stop(grace)
        if self._server is not None:
            if grace is not None and self._relay is not None:
                started = time.monotonic()
                await self._relay.settle(_SETTLE_QUIET_SECONDS, min(grace, _SETTLE_LIMIT_SECONDS))
                grace = max(0.0, grace - (time.monotonic() - started))
            await self._server.stop(grace)
        if self._upstream is not None:
            await self._upstream.close()


def _describe_rules(rules: AllowRules) -> str:
    """The allowlist as the start-up line states it."""
    if rules.allow_all:
        return "allow-all: any certificate signed by the CA may call"
    parts = [
        f"{kind}={','.join(patterns)}"
        for kind, patterns in (
            ("allow-cn", rules.cn),
            ("allow-dns", rules.dns),
            ("allow-uri", rules.uri),
        )
        if patterns
    ]
    return "allow " + " ".join(parts)
