"""The budgets that protect the sidecar from its callers: one frozen value per route.

Every budget a caller can exhaust (connections, handshakes, header sizes, control
frames, stream resets, idle time, the patience given to a denied caller) is a
setting with a default that a real deployment never reaches, and exceeding one
costs the connection at fault only. The settings table (settings.py) declares
them, with their defaults; this module holds the values a route runs with, and
the few figures derived from them. Where each budget is enforced:
splice/listener.py with splice/admission.py (connections, handshakes, chain
length), splice/connection.py with h2/frames.py and h2/headerblock.py (header
lists, frames, resets, idle time) and splice/refusal.py (denied callers); on the
grpc plane, grpc core, given them by grpcplane/plane.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from sidecar.config.settings import BY_KEY


def _default(key: str) -> object:
    return BY_KEY[key].default


@dataclass(frozen=True)
class Limits:
    """A route's budgets; the defaults are the settings table's."""

    max_connections: int = _default("max_connections")  # type: ignore[assignment]
    max_pending_handshakes: int = _default("max_pending_handshakes")  # type: ignore[assignment]
    handshake_timeout: float = _default("handshake_timeout")  # type: ignore[assignment]
    max_chain_length: int = _default("max_chain_length")  # type: ignore[assignment]
    connect_timeout: float = _default("connect_timeout")  # type: ignore[assignment]
    idle_timeout: float = _default("idle_timeout")  # type: ignore[assignment]
    header_timeout: float = _default("header_timeout")  # type: ignore[assignment]
    max_header_list_size: int = _default("max_header_list_size")  # type: ignore[assignment]
    max_header_fields: int = _default("max_header_fields")  # type: ignore[assignment]
    control_frame_rate: int = _default("control_frame_rate")  # type: ignore[assignment]
    reset_rate: int = _default("reset_rate")  # type: ignore[assignment]
    denied_calls: int = _default("denied_calls")  # type: ignore[assignment]
    denied_lifetime: float = _default("denied_lifetime")  # type: ignore[assignment]

    # Figures derived from the settings (documented with them in the README).

    @property
    def control_frame_burst(self) -> int:
        """Control frames a connection may send at once, before the rate applies."""
        return 10 * self.control_frame_rate

    @property
    def reset_burst(self) -> int:
        """Streams a caller may reset at once, before the rate applies."""
        return 10 * self.reset_rate

    @property
    def max_header_block(self) -> int:
        """The encoded size of a request's header block (HPACK may only compress; a block
        much larger than the decoded list it stands for is padding or an attack)."""
        return 2 * self.max_header_list_size

    @property
    def stateful_header_bytes(self) -> int:
        """Decoded header bytes a connection may send before its HPACK table is empty:
        until then each block is decoded and re-encoded, and a small indexed block can
        stand for a large list (HPACK amplification)."""
        return 64 * self.max_header_list_size

    @property
    def denied_frames(self) -> int:
        """Frames a denied connection may send: enough for its calls and their flow control."""
        return 100 + 20 * self.denied_calls

    @property
    def denied_bytes(self) -> int:
        """Bytes a denied connection may send."""
        return 64 * 1024 + self.denied_calls * self.max_header_block

    @property
    def denied_idle_timeout(self) -> float:
        """How long a denied connection (or one answered UNAVAILABLE) may go without
        starting a call: half the shorter of header_timeout and denied_lifetime (5 s by
        default). A gRPC client sends its calls as it has them, so such a connection is
        only being held; and a header block or frame left unfinished starts no call, so it
        is closed within this time too."""
        return min(self.header_timeout, self.denied_lifetime) / 2


LIMIT_KEYS = tuple(field.name for field in fields(Limits))
