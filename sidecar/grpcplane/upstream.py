"""The sidecar's connection to its upstream: one long-lived grpc.aio channel, tuned for relaying."""

from __future__ import annotations

import logging

import grpc
from grpc import aio

from sidecar import __version__
from sidecar.config.addresses import Address
from sidecar.observe.loglimit import LogLimiter
from sidecar.pki.diagnosis import TLSDiagnosis

logger = logging.getLogger("sidecar.upstream")
# Every caller of an unreachable upstream fails the same way: one line per kind of failure.
_failures = LogLimiter(logger, burst=1)

CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    # The default 4 MiB receive cap applies at every hop; a relay must not add one.
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Default backoff (1 s growing to 120 s) keeps failing calls for seconds after
    # the upstream is back; retry fast instead (a reconnect is one TCP+TLS handshake).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.primary_user_agent", f"sidecar/{__version__}"),
)


async def describe_unavailable(
    address: Address, details: str, diagnosis: TLSDiagnosis | None
) -> str:
    """What a caller is told when the upstream cannot be reached: the transport's details,
    with the reason in plain words first when a TLS handshake is to blame. The operator
    reads it too, as a WARNING once per kind of failure and period (rate limited); a
    reason found by the diagnosis is logged by it, once each time it changes."""
    reason = await diagnosis.explain(details) if diagnosis else None
    if reason is None:
        message = f"upstream {address} unavailable: {details}"
        _failures.log(logging.WARNING, (str(address), details), "%s", message)
        return message
    return f"upstream {address} unavailable: {reason} ({details})"


class Upstream:
    """Where calls go: the address and the channel to it (plaintext, or mTLS for egress)."""

    def __init__(
        self,
        address: Address,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        diagnosis: TLSDiagnosis | None = None,
    ) -> None:
        self.address = address
        self.server_name = server_name
        self._diagnosis = diagnosis
        if credentials is None:
            self.channel = aio.insecure_channel(address.target, options=CHANNEL_OPTIONS)
            return
        options = CHANNEL_OPTIONS
        if server_name and server_name != address.host:
            # Checked against the remote's certificate and sent as SNI and :authority.
            options += (("grpc.ssl_target_name_override", server_name),)
        self.channel = aio.secure_channel(address.target, credentials, options=options)

    def connected(self) -> bool:
        """True when the channel has a live connection (used to tell transport from app errors)."""
        state = self.channel.get_state(try_to_connect=False)
        return bool(state == grpc.ChannelConnectivity.READY)

    async def describe_failure(self, details: str) -> str:
        return await describe_unavailable(self.address, details, self._diagnosis)

    async def close(self) -> None:
        await self.channel.close()
