"""What the sidecar learns about each call, and who hears of it: the call record and the
call-observer interface.

Both data planes (and the refusal of callers denied or of an upstream that is down)
report every call that ends to their route's observer, chosen once per route: the
access log (accesslog.py), metrics in time, or, when nothing listens, NO_OBSERVER.
An observer says whether it `observes`: the data planes read what only an observer
needs (message sizes, the response's status) when one does, and skip it when none
does, so that the hot path does not ask which features are on.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(slots=True)
class CallRecord:
    """What a data plane learns about one call while relaying (or answering) it."""

    method: str
    started: float  # time.monotonic() at arrival
    remote: str = "-"  # the caller's address, as grpc names it (ipv4:127.0.0.1:53412)
    peer: str = "-"  # the caller's identity (PeerIdentity.description), when the listener has one
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    bytes_in: int = 0
    bytes_out: int = 0
    route: str | None = None  # the route's name, when the configuration names it
    # Why the call ended as it did, when the sidecar ended it (an upstream that is down,
    # a request refused): what the caller was told.
    details: str = ""
    # A denied call (PERMISSION_DENIED): what denied it, a bounded label (Decision.rule).
    rule: str = ""


class CallObserver:
    """Hears of each call that ends. This base hears nothing: the no-op observer."""

    observes = False  # whether call_ended does anything (see the module doc)

    def call_ended(self, record: CallRecord) -> None:
        """One call is over, with the status its caller was given. The record is the
        reporter's to refill once this returns (the splice keeps one per connection):
        read it now, keep nothing of it but its values."""


NO_OBSERVER = CallObserver()
