"""The sidecar's connection to its upstream: one long-lived grpc.aio channel, tuned for relaying."""

from __future__ import annotations

import grpc
from grpc import aio

from sidecar import __version__
from sidecar.addresses import Address

CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    # The default 4 MiB receive cap applies at every hop; a relay must not add one.
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Default backoff (1 s growing to 120 s) keeps failing calls for seconds after
    # the app is back; a loopback upstream is cheap to retry, so retry fast.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.primary_user_agent", f"sidecar/{__version__}"),
)


class Upstream:
    """Where calls go: the address and the channel to it."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.channel = aio.insecure_channel(address.target, options=CHANNEL_OPTIONS)

    def connected(self) -> bool:
        """True when the channel has a live connection (used to tell transport from app errors)."""
        state = self.channel.get_state(try_to_connect=False)
        return bool(state == grpc.ChannelConnectivity.READY)

    async def close(self) -> None:
        await self.channel.close()
