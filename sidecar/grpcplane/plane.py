"""The per-call data plane of a route (`data_plane: grpc`): a grpc.aio server whose one
generic handler relays every call (relay.py) over one channel to the upstream
(upstream.py). The route's credentials, policy, header rules and observer are the
same parts the splice uses (dataplane.py).

grpc.aio's server can end on its own: its accept loop decodes each request's :path as
UTF-8, before any handler runs, and a request whose :path is not (any caller can send
one, allowed or not) ends the loop, and with it the listener (grpcio 1.85). The plane
watches for that and serves again on a new server within a second; the calls in flight
on the route are cancelled, as the old server's shutdown cancels them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace

from grpc import aio

from sidecar.config.limits import Limits
from sidecar.dataplane import RouteParts, log_shared_port
from sidecar.errors import StartupError
from sidecar.grpcplane.relay import Relay
from sidecar.grpcplane.upstream import Upstream
from sidecar.host.ports import port_held

logger = logging.getLogger("sidecar.server")

# A drain on the per-call plane first waits for calls to stop arriving for this long
# (at most _SETTLE_LIMIT_SECONDS): grpc core cancels, at its shutdown, the calls it
# has accepted but not yet handed to the relay (see Relay.settle). Handing one over
# takes a completion-queue round trip: well under a millisecond on an idle machine,
# tens of milliseconds with both cores saturated.
_SETTLE_QUIET_SECONDS = 0.25
_SETTLE_LIMIT_SECONDS = 1.0
# How often the plane checks that grpc.aio's server still serves (see _watch_over).
_WATCH_SECONDS = 0.5

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # A second sidecar can take over the port for a rolling restart (host/ports.py: a
    # port held already is said at start, so that a mistake is not silent).
    ("grpc.so_reuseport", 1),
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
    """The route's budgets that grpc core's server honours (config/model.py refuses the
    others on this plane). Core checks channel argument names against nothing: these are
    the names its headers define (GRPC_ARG_*), and tests/test_grpc_plane.py checks they
    take effect."""
    budgets: tuple[tuple[str, int], ...] = (
        ("grpc.max_metadata_size", limits.max_header_list_size),
        ("grpc.absolute_max_metadata_size", limits.max_header_list_size),
        ("grpc.server_handshake_timeout_ms", max(1, round(limits.handshake_timeout * 1000))),
    )
    if limits.idle_timeout:
        budgets += (("grpc.max_connection_idle_ms", max(1, round(limits.idle_timeout * 1000))),)
    return budgets


def _port_held(host: str, port: int) -> bool:
    try:
        return port_held(host or None, port)
    except OSError:
        return False  # a name that does not resolve: grpc core's bind says why


class GrpcPlane:
    """A route served call by call through grpc.aio."""

    def __init__(self, parts: RouteParts) -> None:
        self._parts = parts
        self._server: aio.Server | None = None
        self._upstream: Upstream | None = None
        self._relay: Relay | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> int:
        """Bind and serve (grpc objects are made here, inside the running loop)."""
        parts = self._parts
        self._upstream = Upstream(parts)
        self._relay = Relay(self._upstream, parts)
        listen = parts.config.listen
        held = listen.unix_path is None and _port_held(listen.host, listen.port)
        port = await self._serve(listen.target)
        if held:  # said once the port is ours too: a bind that failed shares nothing
            log_shared_port(parts.config)
        return port

    async def _serve(self, target: str) -> int:
        """A new grpc.aio server on target, serving, watched; its port."""
        parts = self._parts
        assert self._relay is not None
        server = aio.server(
            handlers=[self._relay], options=SERVER_OPTIONS + _core_budgets(parts.config.limits)
        )
        try:
            if parts.ingress:
                credentials = parts.credentials.grpc_server_credentials()
                port = server.add_secure_port(target, credentials)
            else:
                port = server.add_insecure_port(target)
        except RuntimeError as exc:
            where = parts.config.listen
            raise StartupError(f"cannot listen on {where}: {exc} (address in use?)") from None
        self._server = server
        await server.start()
        self._watch = asyncio.create_task(self._watch_over(server, int(port)))
        return int(port)

    async def _watch_over(self, server: aio.Server, port: int) -> None:
        """Serve again on a new server should this one stop without being stopped.

        grpc.aio says so nowhere public: its shutdown after the crash itself fails with
        the crash's error, so wait_for_termination() never returns. Its core server's
        is_running() turns False (grpcio 1.85, pinned): a flag read twice a second."""
        running = getattr(getattr(server, "_server", None), "is_running", None)
        if running is None:  # another grpcio: nothing to watch by
            return
        while running():
            await asyncio.sleep(_WATCH_SECONDS)
        if self._stopping or self._server is not server:
            return
        stopped: aio.Server = server  # (the test above narrows server to Optional)
        listen = self._parts.config.listen
        target = listen.target if listen.unix_path else replace(listen, port=port).target
        logger.error(
            "%s: grpc.aio's server stopped on its own (a request it could not take; grpc's "
            "log line above says which): serving on a new one; the route's calls in flight "
            "were cancelled",
            self._parts.config.title,
        )
        try:
            await self._serve(target)
        except StartupError as error:
            logger.error("%s: cannot serve again: %s", self._parts.config.title, error)
        # The old server's shutdown was started; let it end, so that grpc core frees it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stopped.stop(None), _WATCH_SECONDS * 10)
            logger.debug("%s: the stopped grpc.aio server is freed", self._parts.config.title)

    def policy_replaced(self, grace: float) -> None:
        """Nothing to do for new calls: each is decided as it arrives, with the current
        rules. (grpc core offers no way to close one caller's connection: a caller no
        longer allowed keeps it open, and each of its new calls is denied; its calls in
        flight run to their end.)"""

    def credentials_replaced(self) -> None:
        """Ingress: nothing (grpc core asks the credentials before each handshake). Egress:
        new calls go over a new channel made with the new certificate and CA."""
        if not self._parts.ingress and self._relay is not None:
            self._relay.renew_channel()

    async def stop(self, grace: float | None) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            if grace is not None and self._relay is not None:
                started = time.monotonic()
                await self._relay.settle(_SETTLE_QUIET_SECONDS, min(grace, _SETTLE_LIMIT_SECONDS))
                grace = max(0.0, grace - (time.monotonic() - started))
            await self._server.stop(grace)
        if self._upstream is not None:
            await self._upstream.close()
