"""The sidecar's Prometheus metrics: what is counted, with which labels, and the observers
that count calls and connections.

One `Metrics` per process holds its own registry (prometheus_client's, not the global
one, so that an embedding program's metrics never mix in); the admin listener
(runtime/admin.py) renders it. Every name starts `sidecar_`; every label is bounded:
routes are the configuration's, codes gRPC's 17, and methods are the first
`method_limit` distinct `:path`s seen per route, every later one counted as `other`
(a caller can send any number of distinct paths).

What the data planes count on every call is kept in plain ints, lists and dicts,
read by a collector at each scrape: the planes and the admin listener share the event
loop's thread, so nothing needs a lock, and counting a call is a dictionary lookup, a
few additions and a bisection (prometheus_client's own counters and histograms take a
lock and resolve labels on each use: 12 us of CPU per call in `make bench`).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sidecar.observe.calls import CallRecord
from sidecar.observe.connections import (
    ConnectionObserver,
    HandshakeFailure,
    RefusalReason,
    UpstreamFailure,
)

# Call durations, seconds: from a cached unary call on loopback to a long stream.
_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                     5, 10, 30, 60, 300)  # fmt: skip
_HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                      5, 10)  # fmt: skip
OTHER = "other"
_LABEL_BYTES = 256  # a longer method or caller name is counted as `other`
DEFAULT_METHOD_LIMIT = 100
# Counts kept by (method as sent, code) for a lookup per call: beyond, a call finds its
# label first (the same count, a little slower).
_CACHED_KEYS = 4096
_REFUSAL_REASONS: tuple[RefusalReason, ...] = ("handshake", "denied", "limit")


class _Histogram:
    """Observations in fixed buckets, as plain numbers (see the module doc)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, as Prometheus reads them: (le, observations at or below it)."""
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return cumulative


class Metrics:
    """The process's metrics and their registry."""

    def __init__(self, method_limit: int = DEFAULT_METHOD_LIMIT, caller_limit: int = 0) -> None:
        """caller_limit: callers labelled by name per route (0: calls are not counted by
        caller)."""
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series: noise
        self.registry = CollectorRegistry(auto_describe=True)
        self.method_limit = method_limit
        self.caller_limit = caller_limit
        self.routes: list[tuple[CallsCounted, ConnectionsCounted]] = []
        # What hands calls still held to their counters (calls.Batched.flush): called
        # before each scrape, so that it counts every call that has ended.
        self.before_scrape: list[Callable[[], None]] = []
        registry = self.registry
        # Rare events, counted with prometheus_client's own (their cost does not matter).
        self.reloads = Counter(
            "sidecar_reloads", "Reloads (SIGHUP or reload_interval) by outcome: ok, failed",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.started = Gauge(
            "sidecar_start_time_seconds", "When the process started (Unix time)",
            registry=registry,
        )  # fmt: skip
        self.started.set(time.time())
        registry.register(_Counted(self))

    def route(self, label: str) -> tuple[CallsCounted, ConnectionsCounted]:
        """A route's observers, counting under its label."""
        counted = (
            CallsCounted(label, self.method_limit, self.caller_limit),
            ConnectionsCounted(label),
        )
        self.routes.append(counted)
        return counted

    def watch(self, collector: Collector) -> None:
        """Add a collector read at each scrape (certificate expiry: always the current)."""
        self.registry.register(collector)


class CallsCounted:
    """A route's calls, counted (a batch observer, see calls.Batched: both data planes
    report to it)."""

    def __init__(self, route: str, method_limit: int, caller_limit: int = 0) -> None:
        self.route = route
        self._method_limit = method_limit
        self._caller_limit = caller_limit
        self._callers: set[str] = set()  # the labelled ones; the rest are `other`
        self.by_caller: dict[tuple[str, str], int] = {}  # (caller label, code name) -> calls
        self._methods: set[str] = set()  # the labelled ones; the rest are `other`
        self.calls: dict[tuple[str, str], int] = {}  # (method label, code name) -> calls
        self._labels: dict[tuple[str, str], tuple[str, str]] = {}  # (method, code) -> key
        self.durations = _Histogram(_DURATION_BUCKETS)
        self.request_bytes = 0
        self.response_bytes = 0
        self.denials: dict[str, int] = {}  # by what denied them (a rule; bounded by config)

    def calls_ended(self, records: Sequence[CallRecord]) -> None:
        calls, labels = self.calls, self._labels
        bounds, buckets = self.durations.bounds, self.durations.counts
        seconds, request_bytes, response_bytes = 0.0, 0, 0
        for record in records:
            # (The code's _name_, not the code: an Enum's hash is Python code, ~0.3 us.)
            key = labels.get((record.method, record.code._name_)) or self._label(record)
            calls[key] = calls.get(key, 0) + 1
            duration = record.ended - record.started
            buckets[bisect.bisect_left(bounds, duration)] += 1
            seconds += duration
            request_bytes += record.bytes_in
            response_bytes += record.bytes_out
            if record.rule:
                self.denials[record.rule] = self.denials.get(record.rule, 0) + 1
        self.durations.total += seconds
        self.request_bytes += request_bytes
        self.response_bytes += response_bytes
        if self._caller_limit:
            for record in records:
                self._count_caller(record)

    def _count_caller(self, record: CallRecord) -> None:
        caller = record.peer
        if len(caller) > _LABEL_BYTES:
            caller = OTHER
        elif caller not in self._callers:
            if len(self._callers) < self._caller_limit:
                self._callers.add(caller)
            else:
                caller = OTHER
        key = (caller, record.code._name_)
        self.by_caller[key] = self.by_caller.get(key, 0) + 1

    def _label(self, record: CallRecord) -> tuple[str, str]:
        method = record.method
        if len(method) > _LABEL_BYTES:
            method = OTHER  # (a :path may be ~16 KB: not a label, nor kept)
        elif method not in self._methods:
            if len(self._methods) < self._method_limit:
                self._methods.add(method)
            else:
                method = OTHER
        key = (method, record.code._name_)
        if len(self._labels) < _CACHED_KEYS and len(record.method) <= _LABEL_BYTES:
            self._labels[(record.method, record.code._name_)] = key
        return key


class ConnectionsCounted(ConnectionObserver):
    """A route's caller connections, counted (the splice reports them)."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.accepted_count = 0
        self.open_count = 0
        self.closed_count = 0
        self.refusals = dict.fromkeys(_REFUSAL_REASONS, 0)
        self.handshakes = _Histogram(_HANDSHAKE_BUCKETS)
        self.handshake_failures: dict[str, int] = {}  # by kind (a bounded set)
        self.upstream_failures: dict[str, int] = {}  # by kind (a bounded set)

    def accepted(self) -> None:
        self.accepted_count += 1

    def handshake_done(self, seconds: float) -> None:
        self.handshakes.observe(seconds)

    def refused(self, reason: RefusalReason) -> None:
        self.refusals[reason] += 1

    def handshake_failed(self, kind: HandshakeFailure) -> None:
        self.handshake_failures[kind] = self.handshake_failures.get(kind, 0) + 1

    def upstream_failed(self, kind: UpstreamFailure) -> None:
        self.upstream_failures[kind] = self.upstream_failures.get(kind, 0) + 1

    def opened(self) -> None:
        self.open_count += 1

    def closed(self) -> None:
        self.open_count -= 1
        self.closed_count += 1


class _Counted(Collector):
    """The data planes' counts, as metric families, read at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for flush in self._metrics.before_scrape:
            flush()
        routes = self._metrics.routes
        calls = CounterMetricFamily(
            "sidecar_calls", "Calls ended, by route, method and the gRPC status the caller got",
            labels=["route", "method", "code"],
        )  # fmt: skip
        durations = HistogramMetricFamily(
            "sidecar_call_duration_seconds", "Call durations, from arrival to the status",
            labels=["route"],
        )  # fmt: skip
        requests = CounterMetricFamily(
            "sidecar_request_bytes", "Request message bytes relayed to the app (gRPC framing "
            "included)", labels=["route"],
        )  # fmt: skip
        responses = CounterMetricFamily(
            "sidecar_response_bytes", "Response message bytes relayed to callers (gRPC "
            "framing included)", labels=["route"],
        )  # fmt: skip
        accepted = CounterMetricFamily(
            "sidecar_connections_accepted", "Caller connections accepted (before TLS)",
            labels=["route"],
        )  # fmt: skip
        opened = GaugeMetricFamily(
            "sidecar_connections_open", "Caller connections open now", labels=["route"]
        )
        closed = CounterMetricFamily(
            "sidecar_connections_closed", "Caller connections closed (after TLS)",
            labels=["route"],
        )  # fmt: skip
        by_caller = CounterMetricFamily(
            "sidecar_calls_by_caller", "Calls ended, by route, caller (the certificate's "
            "names; the first metrics_callers, later ones as 'other') and gRPC status",
            labels=["route", "caller", "code"],
        )  # fmt: skip
        refused = CounterMetricFamily(
            "sidecar_connections_refused", "Caller connections refused, by reason: handshake "
            "(the TLS handshake failed), denied (no rule admits the caller), limit (a budget)",
            labels=["route", "reason"],
        )  # fmt: skip
        handshakes = HistogramMetricFamily(
            "sidecar_tls_handshake_duration_seconds", "TLS handshakes that completed",
            labels=["route"],
        )  # fmt: skip
        handshake_failures = CounterMetricFamily(
            "sidecar_tls_handshake_failures", "Caller TLS handshakes that failed, by kind: "
            "silent (no ClientHello), timeout, closed, no_certificate, unknown_ca, expired, "
            "bad_certificate, chain_too_long, protocol, rejected_by_caller (the caller refused "
            "the sidecar's certificate), other",
            labels=["route", "kind"],
        )  # fmt: skip
        upstream_failures = CounterMetricFamily(
            "sidecar_upstream_failures", "Failures to reach the upstream, or losses of it, by "
            "kind: refused, timeout, unreachable, tls (egress), not_http2, silent, closed (before "
            "it spoke), lost (with calls in flight), other",
            labels=["route", "kind"],
        )  # fmt: skip
        denials = CounterMetricFamily(
            "sidecar_denials", "Calls denied, by what denied them: a deny rule's title, 'no "
            "rule matched', 'not allowed' (no allow_* rule), 'revoked', 'no certificate'",
            labels=["route", "rule"],
        )  # fmt: skip
        for counted, connections in routes:
            route = counted.route
            for (method, code), count in counted.calls.items():
                calls.add_metric([route, method, code], count)
            for rule, count in counted.denials.items():
                denials.add_metric([route, rule], count)
            for (caller, code), count in counted.by_caller.items():
                by_caller.add_metric([route, caller, code], count)
            histogram = counted.durations
            durations.add_metric([route], histogram.buckets(), histogram.total)
            requests.add_metric([route], counted.request_bytes)
            responses.add_metric([route], counted.response_bytes)
            accepted.add_metric([route], connections.accepted_count)
            opened.add_metric([route], connections.open_count)
            closed.add_metric([route], connections.closed_count)
            for reason, count in connections.refusals.items():
                refused.add_metric([route, reason], count)
            histogram = connections.handshakes
            handshakes.add_metric([route], histogram.buckets(), histogram.total)
            for kind, count in connections.handshake_failures.items():
                handshake_failures.add_metric([route, kind], count)
            for kind, count in connections.upstream_failures.items():
                upstream_failures.add_metric([route, kind], count)
        yield from (calls, durations, requests, responses, accepted, opened, closed, refused,
                    handshakes, handshake_failures, upstream_failures, denials)  # fmt: skip
        if self._metrics.caller_limit:
            yield by_caller

    def describe(self) -> Iterable[Metric]:
        return []


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
