"""The grpc plane's connection to its upstream: one long-lived grpc.aio channel, tuned for
relaying (plaintext to the app for ingress, mTLS with the route's certificate for egress)."""

from __future__ import annotations

import asyncio

import grpc
from grpc import aio

from sidecar.dataplane import RouteParts

CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    # The default 4 MiB receive cap applies at every hop; a relay must not add one.
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Default backoff (1 s growing to 120 s) keeps failing calls for seconds after
    # the upstream is back; retry fast instead (a reconnect is one TCP+TLS handshake).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)
# How long a channel replaced by a reload (egress: new credentials) keeps its calls in
# flight before it closes: a stream that outlives this is cancelled.
RETIRED_CHANNEL_GRACE_SECONDS = 600.0


class Upstream:
    """Where calls go: the address and the channel to it (plaintext, or mTLS for egress)."""

    def __init__(self, parts: RouteParts) -> None:
        self._parts = parts
        self.address = parts.config.upstream
        self.channel = self._open()
        self._retiring: set[asyncio.Task[None]] = set()

    def _open(self) -> aio.Channel:
        parts, config = self._parts, self._parts.config
        # Sent before grpc core's own name (the header rules name the sidecar's).
        options: tuple[tuple[str, int | str], ...] = (
            *CHANNEL_OPTIONS,
            ("grpc.primary_user_agent", parts.headers.user_agent),
        )
        if parts.ingress:
            return aio.insecure_channel(self.address.target, options=options)
        server_name = config.tls_name
        if server_name and server_name != self.address.host:
            # Checked against the remote's certificate and sent as SNI and :authority.
            options += (("grpc.ssl_target_name_override", server_name),)
        credentials = parts.credentials.current().grpc_channel_credentials
        return aio.secure_channel(self.address.target, credentials, options=options)

    def renew(self) -> None:
        """A new channel for new calls, made with the route's current credentials (egress:
        they were reloaded); the old one closes once its calls in flight are over."""
        retired, self.channel = self.channel, self._open()
        task = asyncio.get_running_loop().create_task(retired.close(RETIRED_CHANNEL_GRACE_SECONDS))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def connected(self) -> bool:
        """True when the channel has a live connection (used to tell transport from app errors)."""
        state = self.channel.get_state(try_to_connect=False)
        return bool(state == grpc.ChannelConnectivity.READY)

    async def describe_failure(self, details: str) -> str:
        return await self._parts.upstream_unavailable(details)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await self.channel.close()
