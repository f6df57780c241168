"""What a route gives its data plane, and what a data plane does with it.

A route (runtime/route.py) builds the parts both planes share, once: its
credentials, its policy, its header rules, its call observer, and (egress) the
diagnosis of TLS failures to the remote. A data plane (the splice, or the grpc
plane) takes those parts and serves the route's listener with them, so that a
rule, a header or an observer written once works on both. Which plane serves a
route is a name in runtime/route.py's table.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sidecar.auth.headers import HeaderRules
from sidecar.auth.policy import Policy
from sidecar.config.model import RouteConfig
from sidecar.observe.calls import CallObserver
from sidecar.observe.connections import NO_CONNECTION_OBSERVER, ConnectionObserver
from sidecar.observe.loglimit import LogLimiter
from sidecar.pki.credentials import SwappedCredentials
from sidecar.pki.diagnosis import TLSDiagnosis

# Both planes log an unreachable upstream under the grpc plane's historical name.
_failures = LogLimiter(logging.getLogger("sidecar.upstream"), burst=1)
# Calls a rule in audit mode would deny: a line each, rate limited per caller.
_audits = LogLimiter(logging.getLogger("sidecar.server"))


# A line per denied call would let a denied caller write the log at its call rate.
_denials = LogLimiter(logging.getLogger("sidecar.server"))


def log_denial(peer: str, remote: str, method: str, reason: str) -> None:
    """A denied call, in the log (both planes): WARNING, rate limited per caller, with the
    caller's address; in the JSON format, each as a field of its own (event "denied")."""
    fields = {"event": "denied", "peer": peer, "remote": remote, "method": method,
              "reason": reason}  # fmt: skip
    _denials.log(logging.WARNING, peer, "denied: %s (from %s)", reason, remote,
                 extra={"fields": fields})  # fmt: skip


def log_audit(peer: str, denial: str) -> None:
    """A call let through because the rule that denies it is in audit mode (both planes)."""
    _audits.log(logging.WARNING, peer, "audit: would deny: %s", denial)


# grpc_health: sidecar: the methods of grpc.health.v1.Health the sidecar answers, and its
# answer, written from health.proto (a HealthCheckResponse is field 1, `status`, a
# varint: SERVING = 1, NOT_SERVING = 2): the only protobuf messages the sidecar writes.
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
_HEALTH_RESPONSES = {True: b"\x08\x01", False: b"\x08\x02"}


def health_response(serving: bool) -> bytes:
    """The HealthCheckResponse message (without gRPC's 5-byte prefix) for this status.
    The same for every service a caller names: the sidecar knows its app as a whole."""
    return _HEALTH_RESPONSES[serving]


class Serving:
    """Whether a route is ready to serve (its readiness, runtime/route.py), for the health
    answers of `grpc_health: sidecar`: read by a Check, followed by a Watch. The route
    sets it after each check of its app; watchers hear of each change, on the loop."""

    def __init__(self, serving: bool = False) -> None:
        self.serving = serving
        self.closed = False  # the route is stopping: NOT_SERVING for good, Watch calls end
        self._watchers: set[Callable[[bool], None]] = set()

    def set(self, serving: bool) -> None:
        if serving == self.serving or self.closed:
            return
        self.serving = serving
        for watcher in list(self._watchers):
            watcher(serving)

    def close(self) -> None:
        """The route stops: NOT_SERVING from now on, and watchers hear it (once more, if it
        was so already: the grpc plane's Watch calls then end)."""
        self.serving = False
        self.closed = True
        for watcher in list(self._watchers):
            watcher(False)

    def watch(self, watcher: Callable[[bool], None]) -> None:
        """Call watcher(serving) at each change, until unwatch."""
        self._watchers.add(watcher)

    def unwatch(self, watcher: Callable[[bool], None]) -> None:
        self._watchers.discard(watcher)


@dataclass(frozen=True)
class RouteParts:
    """One route's shared parts, as its data plane gets them."""

    config: RouteConfig
    credentials: SwappedCredentials  # ingress: the listener's; egress: towards the remote
    policy: Policy  # ingress: who may call (egress: local callers are the app itself)
    headers: HeaderRules
    observer: CallObserver
    diagnosis: TLSDiagnosis | None = None  # egress: why a TLS handshake to the remote failed
    connections: ConnectionObserver = NO_CONNECTION_OBSERVER  # the splice's caller connections
    # Ingress with `grpc_health: sidecar`: grpc.health.v1 calls are answered from this.
    health: Serving | None = None
    # A worker's (runtime/workers.py): the listening sockets its supervisor bound, served
    # instead of binding its own.
    listening: list[socket.socket] | None = None

    @property
    def ingress(self) -> bool:
        """Ingress (mTLS callers, the allowlist, a plaintext app) or egress (plaintext local
        callers, mTLS to the remote)."""
        return self.config.mode == "ingress"

    async def upstream_unavailable(self, details: str) -> str:
        """What a caller is told when the upstream cannot be reached: the transport's details,
        with the reason in plain words first when a TLS handshake is to blame. The operator
        reads it too, as a WARNING once per kind of failure and period (rate limited); a
        reason found by the diagnosis is logged by it, once each time it changes."""
        upstream = self.config.upstream
        diagnosis = self.diagnosis
        reason = await diagnosis.explain(details) if diagnosis is not None else None
        if reason is None:
            message = f"upstream {upstream} unavailable: {details}"
            fields = {"event": "upstream_unavailable", "upstream": str(upstream), "reason": details}
            _failures.log(
                logging.WARNING, (str(upstream), details), "%s", message, extra={"fields": fields}
            )
            return message
        return f"upstream {upstream} unavailable: {reason} ({details})"


def log_shared_port(config: RouteConfig) -> None:
    """Say that the route's port is shared with another process (host/ports.py)."""
    logging.getLogger("sidecar.server").warning(
        "%s: another process listens on %s too: new connections are shared with it until "
        "it stops (a rolling restart); if that is not what you meant, stop one of the two",
        config.title,
        config.listen,
    )


class DataPlane(Protocol):
    """A route's listener and the relaying behind it, with an explicit lifecycle."""

    async def start(self) -> int:
        """Bind and start serving; the port bound (0 for a unix socket)."""
        ...

    def policy_replaced(self, grace: float) -> None:
        """The route's allow rules were replaced (a reload): apply them to established
        connections (new connections and calls read the policy anyway); a caller no longer
        allowed has grace seconds (the drain grace) for its calls in flight."""
        ...

    def credentials_replaced(self) -> None:
        """The route's credentials were replaced (a reload): whatever was made with the old
        ones and outlives a handshake (an egress channel, an egress splice) moves on."""
        ...

    async def stop(self, grace: float | None) -> None:
        """Stop accepting; let calls in flight finish for up to grace seconds; end the rest."""
        ...
