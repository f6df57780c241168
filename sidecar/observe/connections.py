"""Who hears of connections: the connection-observer interface.

The spliced data plane reports each caller connection's life to its route's observer:
accepted, its TLS handshake done (and how long it took) or failed (and what kind of
failure), refused (denied, or over a budget), open, closed; and each failure to reach
or keep the upstream (both planes). The metrics (metrics.py) count them; when no admin
listener serves metrics, NO_CONNECTION_OBSERVER hears nothing at no cost.
"""

from __future__ import annotations

from typing import Literal

# Why a connection was refused: its TLS handshake failed, no rule admits its caller, or a
# budget (max_connections, descriptors) was spent.
RefusalReason = Literal["handshake", "denied", "limit"]

# What kind of TLS handshake failure (splice/handshake.py failure_kind), a bounded set.
HandshakeFailure = Literal[
    "silent", "timeout", "closed", "no_certificate", "unknown_ca", "expired",
    "bad_certificate", "chain_too_long", "protocol", "rejected_by_caller", "other",
]  # fmt: skip

# Why the upstream could not be reached, or was lost (splice/listener.py upstream_failure).
UpstreamFailure = Literal[
    "refused", "timeout", "unreachable", "tls", "not_http2", "silent", "closed", "lost", "other"
]


class ConnectionObserver:
    """Hears of caller connections. This base hears nothing: the no-op observer."""

    def accepted(self) -> None:
        """A connection was accepted (before TLS)."""

    def handshake_done(self, seconds: float) -> None:
        """Its TLS handshake completed, in seconds."""

    def refused(self, reason: RefusalReason) -> None:
        """It was refused, and why."""

    def handshake_failed(self, kind: HandshakeFailure) -> None:
        """Its TLS handshake failed (it is refused too: refused("handshake"))."""

    def upstream_failed(self, kind: UpstreamFailure) -> None:
        """The upstream could not be reached for a connection or a call, or was lost."""

    def opened(self) -> None:
        """It is open (TLS done, or egress): counted among the open ones until closed()."""

    def closed(self) -> None:
        """An open connection closed."""


NO_CONNECTION_OBSERVER = ConnectionObserver()
