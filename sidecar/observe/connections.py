"""Who hears of caller connections: the connection-observer interface.

The spliced data plane reports each caller connection's life to its route's observer:
accepted, its TLS handshake done (and how long it took) or failed, refused (denied, or
over a budget), open, closed. The metrics (metrics.py) count them; when no admin
listener serves metrics, NO_CONNECTION_OBSERVER hears nothing at no cost.
"""

from __future__ import annotations

from typing import Literal

# Why a connection was refused: its TLS handshake failed, no rule admits its caller, or a
# budget (max_connections, descriptors) was spent.
RefusalReason = Literal["handshake", "denied", "limit"]


class ConnectionObserver:
    """Hears of caller connections. This base hears nothing: the no-op observer."""

    def accepted(self) -> None:
        """A connection was accepted (before TLS)."""

    def handshake_done(self, seconds: float) -> None:
        """Its TLS handshake completed, in seconds."""

    def refused(self, reason: RefusalReason) -> None:
        """It was refused, and why."""

    def opened(self) -> None:
        """It is open (TLS done, or egress): counted among the open ones until closed()."""

    def closed(self) -> None:
        """An open connection closed."""


NO_CONNECTION_OBSERVER = ConnectionObserver()
