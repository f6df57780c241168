"""The sidecar's Prometheus metrics: what is counted, with which labels, and the call observer
that counts each call.

One `Metrics` per process holds its own registry (prometheus_client's, not the global
one, so that an embedding program's metrics never mix in); the admin listener
(runtime/admin.py) renders it. Every name starts `sidecar_`; every label is bounded:
routes are the configuration's, codes gRPC's 17, and methods are the first
`method_limit` distinct `:path`s seen per route, every later one counted as `other`
(a caller can send any number of distinct paths).

Counting a call is one dictionary lookup and a few increments on children cached by
their labels: the splice's per-call cost, not prometheus_client's label resolution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.observe.calls import CallObserver, CallRecord
from sidecar.observe.connections import ConnectionObserver, RefusalReason

# Call durations, seconds: from a cached unary call on loopback to a long stream.
_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                     5, 10, 30, 60, 300)  # fmt: skip
_HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                      5, 10)  # fmt: skip
OTHER_METHOD = "other"
# Children kept by (method as sent, code): beyond, a call resolves its labels (slower, same count).
_CACHED_CHILDREN = 4096
DEFAULT_METHOD_LIMIT = 100


class Metrics:
    """The process's metrics and their registry."""

    def __init__(self, method_limit: int = DEFAULT_METHOD_LIMIT) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series: noise
        self.registry = CollectorRegistry(auto_describe=True)
        self.method_limit = method_limit
        registry = self.registry
        self.calls = Counter(
            "sidecar_calls", "Calls ended, by route, method and the gRPC status the caller got",
            ["route", "method", "code"], registry=registry,
        )  # fmt: skip
        self.call_seconds = Histogram(
            "sidecar_call_duration_seconds", "Call durations, from arrival to the status",
            ["route"], buckets=_DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.request_bytes = Counter(
            "sidecar_request_bytes", "Request message bytes relayed to the app (gRPC framing "
            "included)", ["route"], registry=registry,
        )  # fmt: skip
        self.response_bytes = Counter(
            "sidecar_response_bytes", "Response message bytes relayed to callers (gRPC framing "
            "included)", ["route"], registry=registry,
        )  # fmt: skip
        self.connections = Counter(
            "sidecar_connections_accepted", "Caller connections accepted (before TLS)",
            ["route"], registry=registry,
        )  # fmt: skip
        self.connections_open = Gauge(
            "sidecar_connections_open", "Caller connections open now", ["route"],
            registry=registry,
        )  # fmt: skip
        self.refusals = Counter(
            "sidecar_connections_refused", "Caller connections refused, by reason: handshake "
            "(the TLS handshake failed), denied (no rule admits the caller), limit (a budget)",
            ["route", "reason"], registry=registry,
        )  # fmt: skip
        self.handshake_seconds = Histogram(
            "sidecar_tls_handshake_duration_seconds", "TLS handshakes that completed",
            ["route"], buckets=_HANDSHAKE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.reloads = Counter(
            "sidecar_reloads", "Reloads (SIGHUP or reload_interval) by outcome: ok, failed",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.started = Gauge(
            "sidecar_start_time_seconds", "When the process started (Unix time)",
            registry=registry,
        )  # fmt: skip
        self.started.set(time.time())

    def observer(self, route: str) -> CallsCounted:
        return CallsCounted(self, route)

    def connection_observer(self, route: str) -> ConnectionsCounted:
        return ConnectionsCounted(self, route)

    def watch(self, collector: Collector) -> None:
        """Add a collector read at each scrape (certificate expiry: always the current)."""
        self.registry.register(collector)


class CallsCounted(CallObserver):
    """A route's calls, counted (a call observer: both data planes report to it)."""

    observes = True

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self._route = route
        self._methods: set[str] = set()  # the labelled ones; the rest are `other`
        # Children by (method, code): resolved once, so that a call costs a lookup.
        self._calls: dict[tuple[str, object], Callable[[float], None]] = {}
        self._duration = metrics.call_seconds.labels(route)
        self._request_bytes = metrics.request_bytes.labels(route)
        self._response_bytes = metrics.response_bytes.labels(route)

    def call_ended(self, record: CallRecord) -> None:
        key = (record.method, record.code)
        count = self._calls.get(key)
        if count is None:
            count = self._child(record)
        count(1)
        self._duration.observe(time.monotonic() - record.started)
        if record.bytes_in:
            self._request_bytes.inc(record.bytes_in)
        if record.bytes_out:
            self._response_bytes.inc(record.bytes_out)

    def _child(self, record: CallRecord) -> Callable[[float], None]:
        method = record.method
        if method not in self._methods:
            if len(self._methods) < self._metrics.method_limit:
                self._methods.add(method)
            else:
                method = OTHER_METHOD
        count = self._metrics.calls.labels(self._route, method, record.code.name).inc
        if len(self._calls) < _CACHED_CHILDREN:
            self._calls[(record.method, record.code)] = count
        return count


class ConnectionsCounted(ConnectionObserver):
    """A route's caller connections, counted (the splice reports them)."""

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._accepted = metrics.connections.labels(route).inc
        self._handshake = metrics.handshake_seconds.labels(route).observe
        self._open = metrics.connections_open.labels(route)
        self._refused = {
            reason: metrics.refusals.labels(route, reason).inc
            for reason in ("handshake", "denied", "limit")
        }

    def accepted(self) -> None:
        self._accepted()

    def handshake_done(self, seconds: float) -> None:
        self._handshake(seconds)

    def refused(self, reason: RefusalReason) -> None:
        self._refused[reason]()

    def opened(self) -> None:
        self._open.inc()

    def closed(self) -> None:
        self._open.dec()


class Observers(CallObserver):
    """Several observers as one (the access log and the metrics)."""

    def __init__(self, observers: Iterable[CallObserver]) -> None:
        self._observers = tuple(observer for observer in observers if observer.observes)
        self.observes = bool(self._observers)

    def call_ended(self, record: CallRecord) -> None:
        for observer in self._observers:
            observer.call_ended(record)


class Expiries(Collector):
    """Certificates' not-after times, read at each scrape from what is in use now."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, float]]]) -> None:
        self._read = read  # (route, which: own | ca, not-after as Unix time)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "sidecar_certificate_expiry_timestamp_seconds",
            "When a certificate in use stops being valid (Unix time): the route's own "
            "(which=own) and the earliest of its CA bundle (which=ca)",
            labels=["route", "which"],
        )
        for route, which, not_after in self._read():
            family.add_metric([route, which], not_after)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []
