"""The spliced data plane: one caller connection joined to one upstream connection.

Bytes cross as they come. A `FrameWalker` per direction finds the frame
boundaries; only header blocks are read (requests are filtered by the route's
header rules and get the sidecar's user-agent; trailers, or a non-gRPC response's
:status, give each call's status) and DATA payloads are walked for message sizes
when the route's call observer wants them. Every call is kept in a ledger
(h2/calls.py) and reported to that observer when it ends. PINGs are answered by
the splice on the side they come from (own_frames.py). Everything else (DATA,
flow control, RST_STREAM, GOAWAY, SETTINGS but for the table size) crosses
unchanged, so gRPC's semantics hold exactly: deadlines, cancellation, half-close,
flow control, trailers and message sizes are the two peers' own.

Until the upstream has sent its first bytes, the caller's bytes are also kept:
if the upstream cannot be reached (connection refused, a TLS failure, closed
before speaking), a `Refusal` replays them and answers each call UNAVAILABLE
with the reason. Backpressure is end to end: when one side's write buffer is
full, the other side stops being read. Where the splice is in its life is one
`Phase`, which only moves forward.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Sequence

import grpc

from sidecar.auth.policy import Decision
from sidecar.config.limits import Limits
from sidecar.dataplane import Serving, log_audit, log_denial
from sidecar.h2.calls import Call, message_bytes, method_of, reset_status, status_code
from sidecar.h2.frames import (
    DROP,
    END_STREAM,
    GOAWAY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    FrameError,
    FrameWalker,
    _Drop,
    frame,
    header_frames,
)
from sidecar.h2.headerblock import (
    HeaderBlockError,
    HeaderLimits,
    RequestBlocks,
    RequestFilter,
    RequestRefused,
    ResponseBlocks,
    status_block,
)
from sidecar.observe.calls import NO_OBSERVER, CallObserver
from sidecar.observe.loglimit import LogLimiter
from sidecar.splice import health as health_answers
from sidecar.splice.budget import BudgetExceeded, TokenBucket
from sidecar.splice.own_frames import (
    DRAIN_OPAQUE,
    DRAIN_OPENING,
    DRAIN_PING_SECONDS,
    HANG_UP_SECONDS,
    OwnFrames,
)
from sidecar.splice.refusal import Refusal, told

# Health Watch calls one connection may hold open.
_MAX_WATCHES = 16
# grpc_health: sidecar: what of the caller's connection window the app is not given, for
# the splice's own health answers (see Splice._answer_health): 585 status messages.
_WINDOW_RESERVE = 4096
_WATCH_OVER = "the sidecar is closing this connection: watch again"
# A gRPC message prefix's length (after its flag byte), for counting message bytes.
_unpack_u32 = struct.Struct(">I").unpack_from
logger = logging.getLogger("sidecar.server")

# Caller bytes kept for a replay until the upstream speaks; past this, the caller
# is not read until it does (or fails).
_REPLAY_LIMIT = 256 * 1024
# Per transport: past this much unsent data, the other side stops being read.
WRITE_BUFFER_HIGH = 256 * 1024
# How long a closing connection may take to send what is buffered for a peer.
_CLOSE_GRACE_SECONDS = 10.0
# Answers of the splice's own to a caller (PING answers, requests refused here, window
# credit) while it does not read, or waiting here for the frame relayed to it to be whole,
# before its connection is cut: a caller that goes on asking without reading the answers
# is flooding (the HTTP/2 "ping flood", and its kin).
_MAX_UNREAD_ANSWERS = 1000
# How long a PING ACK waits for relayed bytes going the same way, to ride with them
# instead of costing a write (and, to a caller, a TLS record) of its own. gRPC peers
# ping once per burst of data they receive (to estimate the bandwidth-delay product),
# so without this every unary call costs two extra writes and two extra wake-ups of
# the peers. While data flows, the ACK goes out with it at once: it travels the same
# way as the data the pinging peer receives. The wait is for a quiet connection (a
# keepalive PING): far below any keepalive timeout, and well above the event loop's
# 1 ms timer resolution, which made a 1 ms wait often end before the reply it waited
# for.
_ACK_DELAY_SECONDS = 0.005
# Relayed chunks of at most this many bytes in all are joined before a write, so that
# they leave in one TLS record (a record holds up to 16 KiB).
_JOIN_LIMIT = 16 * 1024


class UpstreamSilent(ConnectionError):
    """The upstream accepted the connection but sent nothing in time."""


class UpstreamNotHttp2(ConnectionError):
    """The upstream answered, but not in HTTP/2 (or broke it before its first frame)."""


class UpstreamClosedEarly(ConnectionError):
    """The upstream closed the connection before it spoke."""


# An upstream that accepted the connection (and, for TLS, finished the handshake)
# and closed it without a byte: for TLS 1.3, typically a refused client certificate.
_CLOSED_BEFORE_SPEAKING = UpstreamClosedEarly(
    "the connection was closed before the upstream spoke (after any TLS handshake)"
)
_NO_ERROR, _PROTOCOL_ERROR, _CANCEL, _ENHANCE_YOUR_CALM = 0x0, 0x1, 0x8, 0xB
# Budgets broken, upstreams lost: one line per reason and route per period, not per connection.
_limited_log = LogLimiter(logger)
# Methods whose decision a connection remembers (a client calls a handful of methods).
_DECISIONS_KEPT = 64

# Opens the upstream connection with the protocol from the factory given.
Connector = Callable[
    [Callable[[], asyncio.Protocol]], Awaitable[tuple[asyncio.BaseTransport, object]]
]
# Turns a failure to reach the upstream into the details callers get.
Describer = Callable[[BaseException | None], Awaitable[str]]


class Phase(enum.IntEnum):
    """Where a splice is in its life. It only moves forward (`Splice._enter`): a later
    phase is never undone by an earlier one's event (a drain asked of a broken splice)."""

    RELAYING = 0  # (until the upstream speaks, the caller's bytes are also kept for a replay)
    DRAINING = 1  # told GOAWAY: no new calls; the close comes when those in flight are over
    DRAINED = 2  # the drain's last GOAWAY is out: both connections are closing
    FAILING = 3  # the upstream could not be reached: a Refusal answers why (once known)
    BROKEN = 4  # a peer broke HTTP/2 or a budget, or the upstream was lost: nothing relayed
    GONE = 5  # the caller's connection is lost


# The phases as module constants, for the checks made on every read: looking a member up
# on its Enum class costs about 0.2 us each time (a module global, 0.04 us).
_RELAYING, _DRAINING, _DRAINED, _FAILING, _BROKEN, _GONE = Phase


def _close_within(transport: asyncio.Transport, seconds: float) -> None:
    """Close after what is buffered is sent, or abort if the peer does not read it in time."""
    transport.close()
    if transport.get_write_buffer_size():
        asyncio.get_running_loop().call_later(seconds, transport.abort)


def _write(transport: asyncio.Transport, chunks: Sequence[bytes | memoryview]) -> None:
    if len(chunks) == 1:
        transport.write(chunks[0])
    elif not chunks:
        return
    elif sum(map(len, chunks)) <= _JOIN_LIMIT:
        transport.write(b"".join(chunks))
    else:
        transport.writelines(chunks)  # no join: a DATA run may be large


class _UpstreamProtocol(asyncio.Protocol):
    """The upstream connection's events, handed to its Splice."""

    __slots__ = ("_splice",)

    def __init__(self, splice: Splice) -> None:
        self._splice: Splice = splice

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH)  # type: ignore[attr-defined]
        self._splice.upstream_made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._splice.from_upstream(data)

    def eof_received(self) -> bool:
        return False  # close; HTTP/2 has no use for a half-closed connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.upstream_lost(exc)
        self._splice = _NO_SPLICE  # the splice points at the transport, which points here

    def pause_writing(self) -> None:
        self._splice.pause_caller("upstream busy")

    def resume_writing(self) -> None:
        self._splice.resume_caller("upstream busy")


class _NoSplice:
    """Stands in for a Splice once the upstream connection is lost (late callbacks find
    nothing to do)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: None


_NO_SPLICE: Splice = _NoSplice()  # type: ignore[assignment]


class Splice:
    """A caller's connection relayed frame by frame over its own upstream connection.

    Besides relaying, it keeps the caller within its budgets (config/limits.py): control
    frames and calls cancelled before their answer (token buckets; past either the
    caller gets GOAWAY ENHANCE_YOUR_CALM and the connection closes), a header
    block or frame once started must be finished within header_timeout, and a
    connection with no call in flight for idle_timeout is closed with a GOAWAY.
    A request it refuses (too large, malformed) is answered here on its stream and
    never reaches the upstream. When the upstream is lost, every call in flight is
    ended here with UNAVAILABLE and the caller is told GOAWAY, so that its client
    reconnects at once instead of waiting for TCP to notice.
    """

    # One per connection: slots, not a __dict__ (over 30 attributes, it would not share its
    # keys: about 1.6 KiB per idle connection).
    __slots__ = (
        "_ack_delay", "_answers_while_busy", "_authorize", "_caller", "_caller_acks",
        "_caller_busy", "_calls", "_connect_started", "_connecting", "_connector", "_control",
        "_control_seen",
        "_credit", "_data_seen", "_decisions", "_describe_failure", "_drain_ping",
        "_failure", "_first_frame_timer", "_frames_at_timer", "_header_timer", "_health",
        "_held_reports", "_idle_since", "_idle_timer", "_inbound", "_last_stream",
        "_limits", "_loop", "_lost", "_observed", "_observer", "_outbound",
        "_own_to_caller", "_own_to_upstream", "_pauses", "_peer", "_phase", "_refusal",
        "_remote", "_replay", "_replay_size", "_requests", "_resets", "_responses",
        "_revocation_timer", "_revoked", "_revoked_answers", "_route", "_streams_opened",
        "_upstream", "_upstream_last", "_upstream_name", "_upstream_opening",
        "_upstream_spoke", "_watches",
    )  # fmt: skip

    def __init__(
        self,
        caller: asyncio.Transport,
        connect: Connector,
        describe_failure: Describer,
        *,
        peer: str,
        remote: str,
        route: str | None,
        request_filter: RequestFilter,
        observer: CallObserver = NO_OBSERVER,
        upstream_name: str = "upstream",
        limits: Limits | None = None,
        authorize: Callable[[str], Decision] | None = None,
        injected: tuple[bytes, bytes] | None = None,
        ack_delay: float = _ACK_DELAY_SECONDS,
        health: Serving | None = None,
        lost: Callable[[], None] | None = None,
    ) -> None:
        self._caller = caller
        self._upstream: asyncio.Transport | None = None
        self._describe_failure = describe_failure
        self._lost = lost  # told when the upstream is lost abruptly (for the metrics)
        self._peer, self._remote, self._route = peer, remote, route
        self._upstream_name = upstream_name
        self._limits = limits = limits if limits is not None else Limits()
        self._replay: list[bytes] | None = []  # the caller's bytes, until the upstream speaks
        self._replay_size = 0
        # Calls answered here before the upstream spoke, reported once it has (should it
        # fail, the refusal that replays the caller's bytes answers and reports them).
        self._held_reports: list[tuple[Call, grpc.StatusCode, str, str]] = []
        self._refusal: Refusal | None = None
        self._phase = _RELAYING
        self._caller_busy = False  # the caller's write buffer is full
        self._answers_while_busy = 0
        self._failure: asyncio.Task[None] | None = None
        self._pauses: dict[str, None] = {}  # why the caller is not read (a set is 216 B)
        self._calls: dict[int, Call] = {}  # calls in flight, by stream
        self._last_stream = 0
        self._streams_opened = 0  # calls the caller started (see calls_seen)
        # The lowest last-stream id of the upstream's GOAWAYs (relayed to the caller): the
        # sidecar's own GOAWAYs must not name a higher one (RFC 9113 6.8), and streams
        # above it are ignored by the upstream, so they are not tracked as calls.
        self._upstream_last: int | None = None
        self._drain_ping: asyncio.TimerHandle | None = None  # until the caller's ACK
        # Set when the allowlist no longer admits the caller: the reason for each new call,
        # how many were answered so, and when its calls in flight are cut.
        self._revoked: Callable[[str], Decision] | None = None
        self._revoked_answers = 0
        self._revocation_timer: asyncio.TimerHandle | None = None
        # The method rules, for a caller some of whose calls they may deny: decided once
        # per method on this connection (the dict), again after a reload (authorize()).
        self._authorize: Callable[[str], Decision] | None = authorize
        self._decisions: dict[bytes | None, Decision] = {}
        self._own_to_caller = OwnFrames()
        self._own_to_upstream = OwnFrames()
        # grpc_health: sidecar: health calls are answered here (splice/health.py), and the
        # Watch calls open on this connection are kept with the messages each was sent.
        self._health = health
        self._watches: dict[int, health_answers.Watch] = {}
        self._ack_delay = ack_delay
        self._observer = observer
        # Message sizes and statuses are read for an observer only (see observe/calls.py).
        self._observed = observer.observes
        self._control = TokenBucket(limits.control_frame_rate, limits.control_frame_burst)
        self._resets = TokenBucket(limits.reset_rate, limits.reset_burst)
        self._control_seen = 0  # the caller's control frames already paid for
        self._data_seen = 0  # the upstream's data frames already credited
        self._credit = 0  # flow-control bytes of dropped DATA, owed to the caller
        self._caller_acks = 0  # SETTINGS ACKs from the caller
        self._requests = RequestBlocks(
            request_filter,
            injected=injected,  # the caller's identity for the app, when the route sends it
            limits=HeaderLimits(
                list_size=limits.max_header_list_size,
                max_fields=limits.max_header_fields,
                stateful_bytes=limits.stateful_header_bytes,
                block_size=limits.max_header_block,
            ),
        )
        self._responses = ResponseBlocks()
        self._outbound = FrameWalker(
            self._request_headers,
            preface=True,
            data=self._request_data if self._observed else None,
            ended=self._request_ended,
            reset=self._caller_reset,
            ping=self._caller_ping,
            ping_acked=self._caller_acked_ping,
            settings_acked=self._caller_acked_settings,
            dropped_data=self._dropped_data,
            held_window=self._held_window,
        )
        if health is not None:
            # The reserve is withheld from the caller's first connection window updates.
            self._outbound.window_debt = _WINDOW_RESERVE
        self._inbound = FrameWalker(
            self._response_headers,
            preface=False,
            data=self._response_data if self._observed else None,
            ended=self._upstream_ended,
            reset=self._upstream_reset,
            ping=self._upstream_ping,
            settings_acked=self._responses.table_limited,
            goaway=self._upstream_goaway,
            header_list=self._requests.lower_list_size,
            header_list_limit=limits.max_header_list_size,
        )
        self._loop = loop = asyncio.get_running_loop()
        self._header_timer: asyncio.TimerHandle | None = None
        self._frames_at_timer = 0  # the caller's frames walked when the header timer began
        self._first_frame_timer: asyncio.TimerHandle | None = None
        self._upstream_spoke = False
        self._upstream_opening = b""  # its first bytes, until there are 4: a frame type
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = loop.time()
        if limits.idle_timeout:
            self._idle_timer = loop.call_later(limits.idle_timeout, self._idle_check)
        # The upstream connection is opened when the caller first sends (its preface comes
        # with the handshake's end): a caller that completes a handshake and says nothing
        # (a TLS probe, a handshake flood) costs the app no connection.
        self._connector = connect
        self._connect_started = False
        self._connecting: asyncio.Task[None] | None = None  # (let go once done)

    # The caller's side (called by the listener's protocol).

    def feed(self, data: bytes) -> None:
        """Bytes from the caller."""
        if self._refusal is not None:
            self._refusal.feed(data)
            return
        if self._replay is not None:
            if not self._connect_started:
                self._connect_started = True
                self._connecting = self._loop.create_task(self._connect(self._connector))
            self._replay.append(data)
            self._replay_size += len(data)
            if self._replay_size > _REPLAY_LIMIT:
                self.pause_caller("upstream silent")
            if self._upstream is None:
                return  # relayed from the replay once connected
        elif self._upstream is None:
            return  # the upstream is gone and the caller's connection is closing
        self._to_upstream(data)

    @property
    def calls_seen(self) -> int:
        """Calls the caller started here (relayed, or answered here), and before, on the
        refusal that answers it when the upstream cannot be reached."""
        refused = self._refusal.calls_seen if self._refusal is not None else 0
        return self._streams_opened + refused

    def connection_lost(self) -> None:
        """The caller's connection is gone."""
        if self._connecting is not None:
            self._connecting.cancel()
        if self._refusal is not None:
            self._refusal.connection_lost()
        if self._replay is not None:  # gone before the upstream spoke: nothing was answered
            self._replay = None
            held, self._held_reports = self._held_reports, []
            for call, _, details, _ in held:
                self._report_call(call, grpc.StatusCode.CANCELLED, details)
        self._end_calls(grpc.StatusCode.CANCELLED)
        if self._upstream is not None:
            # Nothing more can reach the caller: the upstream's calls end now, and an
            # upstream that stopped reading cannot hold its connection open.
            self._upstream.abort()
        self._enter(_GONE)
        self._release()

    def caller_busy(self) -> None:
        """The caller is not reading: stop reading the upstream (the caller is still read:
        it may be blocked sending until it is, and HTTP/2 flow control bounds its DATA)."""
        self._caller_busy = True
        if self._upstream is not None:
            self._upstream.pause_reading()

    def caller_ready(self) -> None:
        self._caller_busy = False
        self._answers_while_busy = 0
        if self._upstream is not None:
            self._upstream.resume_reading()

    def pause_caller(self, reason: str) -> None:
        if not self._pauses:
            self._caller.pause_reading()
        self._pauses[reason] = None

    def resume_caller(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        del self._pauses[reason]
        if not self._pauses and not self._caller.is_closing():
            self._caller.resume_reading()

    def drain(self) -> None:
        """Tell the caller to start no new calls; close once those in flight are done. Before
        the upstream's SETTINGS have been relayed (the server's preface, which must come
        first), the GOAWAY waits for them."""
        self._enter(_DRAINING)
        if self._phase >= _FAILING:
            self._close_both()
            return
        if not self._connect_started:
            # The caller has sent nothing yet (its handshake ended as the listener stopped,
            # say): answer as a server going away would, an empty SETTINGS (the server's
            # preface) and a GOAWAY naming no stream, so that its client takes its calls to
            # another connection. Closed without a word, it failed them ("Socket closed").
            _write(self._caller, [frame(SETTINGS, 0, 0, b""), self._goaway(_NO_ERROR)])
            self._close_both()
            return
        if self._replay is not None:
            return  # from_upstream drains once the upstream's first frame is relayed
        if self._upstream_last is None:  # else the caller already has a GOAWAY, and a lower one
            self._own_to_caller.frames += DRAIN_OPENING
            self._drain_ping = self._loop.call_later(DRAIN_PING_SECONDS, self._drain_pinged)
            self._send_own_to_caller()
        elif not self._calls:
            self._close_drained()

    def revoke(self, reason: Callable[[str], Decision], grace: float) -> None:
        """The caller is no longer allowed (the allowlist was reloaded): each call it starts
        from now on is answered PERMISSION_DENIED here, with reason(method) as the details
        (denied_calls of them at most); its calls in flight have up to grace seconds to
        finish, and the connection closes as a drain's does."""
        self._revoked = reason
        self._revocation_timer = self._loop.call_later(grace, self._revocation_over)
        self.drain()

    def _revocation_over(self) -> None:
        """A revoked caller's time is up (the grace, or its denied_calls): its calls still in
        flight end here PERMISSION_DENIED (the upstream's with its connection), then the
        close. A long stream does not outlive the allowlist that dropped its caller."""
        self._revocation_timer = None
        if self._phase >= _BROKEN:
            return
        if self._upstream is not None:
            self._upstream.abort()
        self._end_calls_here(
            grpc.StatusCode.PERMISSION_DENIED,
            "the caller is no longer allowed (the allowlist was reloaded), and the calls it "
            "had in flight have had their drain grace",
        )

    def _drain_pinged(self) -> None:
        """The caller has read the first GOAWAY and sent every call it will (or did not
        answer the drain's PING in time): the drain closes once they are over."""
        if self._drain_ping is not None:
            self._drain_ping.cancel()
            self._drain_ping = None
        if not self._calls:
            self._close_drained()

    def _close_drained(self) -> None:
        """The drain's last word: a GOAWAY naming the last stream relayed, so that a call
        the caller started after all (before it saw the first GOAWAY) is known to it as
        not processed and is retried elsewhere, then the close."""
        if self._phase >= _DRAINED:  # a stream's end and its reset can both schedule this
            return
        if self._calls or self._drain_ping is not None:
            # A call started in the same loop turn as the last one ended (its own end
            # schedules this again), or calls may still be on their way (DRAIN_PING_SECONDS).
            return
        self._enter(_DRAINED)
        watches_ended = self._end_watches(grpc.StatusCode.UNAVAILABLE, _WATCH_OVER)
        if self._inbound.at_frame_boundary and not self._caller.is_closing():
            _write(
                self._caller,
                [*self._own_to_caller.take(), *watches_ended, self._goaway(_NO_ERROR)],
            )
        self._close_both()

    def abort(self) -> None:
        """The drain grace is over: end the calls still in flight here, telling their
        callers why, then both connections."""
        if self._upstream is not None:
            self._upstream.abort()  # the upstream's calls end with its connection
        if self._calls and self._refusal is None and self._phase < _BROKEN:
            self._end_calls_here(
                grpc.StatusCode.UNAVAILABLE,
                "the sidecar is shutting down and its drain grace is over",
            )
        self._enter(_BROKEN)  # both connections are cut here: their ends are no news
        self._caller.abort()

    # The upstream's side.

    async def _connect(self, connect: Connector) -> None:
        try:
            await connect(lambda: _UpstreamProtocol(self))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # refused, unreachable, TLS: every caller hears why
            await self._fail(error)
        finally:
            self._connecting = None  # a finished task keeps its coroutine: 0.5 KiB

    def upstream_made(self, transport: asyncio.Transport) -> None:
        """Connected: relay what the caller sent so far (before any upstream byte can arrive)."""
        if self._phase is _GONE:
            transport.close()
            return
        self._upstream = transport
        self._first_frame_timer = self._loop.call_later(
            self._limits.connect_timeout, self._upstream_silent
        )
        for chunk in self._replay or ():
            if self._phase >= _BROKEN:
                break
            self._to_upstream(chunk)

    def _upstream_silent(self) -> None:
        """The upstream accepted the connection but has not sent its SETTINGS in time."""
        self._first_frame_timer = None
        if self._replay is None or self._upstream is None or self._phase is _GONE:
            return
        upstream, self._upstream = self._upstream, None
        upstream.abort()
        # Not a TimeoutError: the describer reads that as a connection never made.
        self._start_failure(
            UpstreamSilent(
                f"the upstream accepted the connection but sent nothing within "
                f"{self._limits.connect_timeout:g}s"
            )
        )

    def from_upstream(self, data: bytes) -> None:
        if self._phase >= _BROKEN:
            return
        if self._replay is not None and not self._upstream_spoke:
            # Its first bytes: a server's connection preface is a SETTINGS frame (RFC 9113
            # 3.4). Anything else is not HTTP/2, and the calls can still be answered why.
            # The frame's type is its 4th byte, which a read may not have reached yet.
            opening = self._upstream_opening + data
            if len(opening) > 3:
                self._upstream_spoke = True
                if opening[3] != SETTINGS:
                    self._not_http2(opening)
                    return
            else:
                self._upstream_opening = opening
        chunks = self._walked(self._inbound, data, from_upstream=True)
        if chunks is None:
            return
        if self._replay is not None and self._inbound.first_frame_done:
            self._replay = None  # the upstream speaks HTTP/2: no replay will be needed
            held, self._held_reports = self._held_reports, []
            for report in held:
                self._report_call(*report)
            if self._first_frame_timer is not None:
                self._first_frame_timer.cancel()
                self._first_frame_timer = None
            self.resume_caller("upstream silent")
            if self._phase is _DRAINING:  # asked to drain before the upstream spoke
                self._loop.call_soon(self.drain)
        earned = self._inbound.data_frames - self._data_seen
        if earned:  # the caller's WINDOW_UPDATEs and PINGs answer what it receives
            self._data_seen = self._inbound.data_frames
            self._control.earn(2 * earned)
        if self._own_to_caller.frames and self._inbound.at_frame_boundary:
            chunks += self._own_to_caller.take()
        _write(self._caller, chunks)
        if self._inbound.backlog:
            self._continue_later(from_upstream=True)

    def _not_http2(self, data: bytes) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()
        shown = repr(bytes(data[:24]))[1:] + ("..." if len(data) > 24 else "")
        self._start_failure(
            UpstreamNotHttp2(f"the upstream does not speak HTTP/2 (it sent {shown})")
        )

    def upstream_lost(self, exc: BaseException | None) -> None:
        if self._phase is _FAILING or self._phase is _GONE:
            return
        self._upstream = None
        if self._phase is _BROKEN or self._phase is _DRAINED:
            return  # closed by the splice itself (the caller was cut, or the drain is over)
        if self._replay is not None:  # lost before it spoke: the calls can still be answered
            self._start_failure(exc or _CLOSED_BEFORE_SPEAKING)
            return
        reason = f": {_failure_text(exc)}" if exc is not None else ""
        if self._calls or self._upstream_last is None:
            if self._lost is not None:
                self._lost()
            _limited_log.log(
                logging.WARNING,
                ("upstream lost", self._upstream_name),
                "upstream %s closed a connection abruptly%s (%d calls in flight ended UNAVAILABLE)",
                self._upstream_name,
                reason,
                len(self._calls),
            )
        self._end_calls_here(
            grpc.StatusCode.UNAVAILABLE,
            f"upstream {self._upstream_name} closed the connection{reason}",
        )

    def _start_failure(self, error: BaseException) -> None:
        self._failure = self._loop.create_task(self._fail(error))

    async def _fail(self, error: BaseException) -> None:
        if self._phase >= _FAILING:  # a timeout and a close can both report one failure
            return
        self._enter(_FAILING)
        details = await self._describe_failure(error)
        if self._phase is not _FAILING or self._caller.is_closing():
            return  # meanwhile the caller left, was cut, or its connection was closed
        if self._first_frame_timer is not None:
            self._first_frame_timer.cancel()
        self._refusal = Refusal(
            self._caller,
            grpc.StatusCode.UNAVAILABLE,
            told(details),
            peer=self._peer,
            remote=self._remote,
            route=self._route,
            goaway=True,
            limits=self._limits,
            observer=self._observer,
            # The app cannot be reached: health calls hear so.
            serving=None if self._health is None else _not_serving,
        )
        replay, self._replay = self._replay or [], None
        self._held_reports.clear()  # the refusal answers those calls again, and reports them
        if self._watches:  # likewise
            self._watches.clear()
            self._health.unwatch(self._health_changed)  # type: ignore[union-attr]
        self._calls.clear()
        self._cancel_timers()
        self._own_to_caller.frames.clear()  # the refusal answers the replayed PINGs itself
        self.resume_caller("upstream silent")
        self.resume_caller("backlog")
        self._refusal.refuse_later_calls()
        for chunk in replay:
            self._refusal.feed(chunk)

    # Frames.

    def _to_upstream(self, data: bytes) -> None:
        if self._phase >= _BROKEN:
            return
        outbound = self._outbound
        chunks = self._walked(outbound, data, from_upstream=False)
        if chunks is None:
            return
        spent = outbound.control_frames - self._control_seen
        if spent:
            self._control_seen = outbound.control_frames
            if not self._control.spend(spent):
                self._calm_down(
                    f"more than {self._limits.control_frame_rate} control frames per second"
                )
                return
        if self._credit:
            # What the app never saw, it will never give back: the caller's connection
            # window gets it from here (its dropped streams' DATA).
            credit, self._credit = self._credit, 0
            self._own_to_caller.frames.append(frame(WINDOW_UPDATE, 0, 0, credit.to_bytes(4, "big")))
            self._send_own_to_caller()
            try:
                self._count_answer()
            except BudgetExceeded as exceeded:
                self._calm_down(str(exceeded))
                return
        if self._watches:  # the caller's window updates may have made room for them
            self._send_watches()
        assert self._upstream is not None
        if self._own_to_upstream.frames and outbound.at_frame_boundary:
            chunks += self._own_to_upstream.take()
        _write(self._upstream, chunks)
        # The timer is left to run when the frame is finished (it then finds none, or another
        # begun since, and times that afresh): not a timer made and cancelled on most reads.
        if self._header_timer is None and outbound.in_frame:
            self._header_timer = self._loop.call_later(
                self._limits.header_timeout, self._header_overdue
            )
            self._frames_at_timer = outbound.control_frames + outbound.data_frames
        if outbound.backlog:
            self._continue_later(from_upstream=False)

    def _continue_later(self, *, from_upstream: bool) -> None:
        """A pass's budget ran out with input left: stop reading that side, and walk on at
        the next turn of the event loop, after the other connections have had theirs."""
        if from_upstream:
            if self._upstream is not None:
                self._upstream.pause_reading()
            self._loop.call_soon(self._walk_backlog, True)
        else:
            self.pause_caller("backlog")
            self._loop.call_soon(self._walk_backlog, False)

    def _walk_backlog(self, from_upstream: bool) -> None:
        if self._phase >= _FAILING:
            return
        if from_upstream:
            self.from_upstream(b"")
            if not self._inbound.backlog and self._upstream is not None and not self._caller_busy:
                self._upstream.resume_reading()
        elif self._upstream is not None:
            self._to_upstream(b"")
            if not self._outbound.backlog:
                self.resume_caller("backlog")

    def _walked(
        self, walker: FrameWalker, data: bytes, *, from_upstream: bool
    ) -> list[bytes | memoryview] | None:
        """The bytes to send on for `data`; None when its sender broke HTTP/2 or a budget,
        or the sidecar failed reading it: then both connections end, and only they."""
        try:
            return walker.feed(data)
        except BudgetExceeded as exceeded:
            self._calm_down(str(exceeded))
            return None
        except (FrameError, HeaderBlockError) as error:
            if from_upstream:  # the operator's own app: worth a warning
                logger.warning(
                    "upstream broke HTTP/2 on a connection for %s: %s", self._remote, error
                )
                if self._replay is not None:
                    self._not_http2_detail(str(error))
                    return None
                self._enter(_BROKEN)
                self._end_calls_here(
                    grpc.StatusCode.UNAVAILABLE,
                    f"upstream {self._upstream_name} broke HTTP/2: {error}",
                )
                if self._upstream is not None:
                    self._upstream.abort()
                return None
            logger.info("caller %s broke HTTP/2: %s", self._remote, error)
            self._hang_up(_PROTOCOL_ERROR, str(error), grpc.StatusCode.INTERNAL)
            return None
        except Exception:
            logger.exception("internal error relaying for %s", self._remote)
        self._stop_relaying()
        return None

    def _not_http2_detail(self, detail: str) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()
        self._start_failure(UpstreamNotHttp2(f"the upstream does not speak HTTP/2 ({detail})"))

    def _request_headers(
        self, stream_id: int, flags: int, buffer: bytes, start: int, end: int
    ) -> bytes | _Drop:
        if stream_id <= self._last_stream:  # trailers, or a block on a stream that is over
            if stream_id in self._outbound.dropped or stream_id not in self._calls:
                # A block on a stream answered here (it never reached the upstream), or on
                # one that is over (the upstream would take it as a protocol error): left
                # out, at a control frame's price.
                self._spend_control(1)
                return DROP
            try:
                return self._requests.rewrite(buffer[start:end], trailers=True)[0]
            except RequestRefused as refused:
                call = self._calls.pop(stream_id)
                self._spend_reset()  # malformed trailers cancel the call as a reset does
                # The upstream knows this stream: it must learn that it is over.
                self._own_to_upstream.frames.append(
                    frame(RST_STREAM, 0, stream_id, _CANCEL.to_bytes(4, "big"))
                )
                call.request_ended = call.request_ended or bool(flags & END_STREAM)
                self._answer_here(stream_id, call, refused)
                self._call_ended()
                return DROP
        self._last_stream = stream_id
        self._streams_opened += 1
        try:
            rewritten, path = self._requests.rewrite(buffer[start:end])
        except RequestRefused as refused:
            self._answer_here(stream_id, Call(None, bool(flags & END_STREAM)), refused)
            return DROP
        if self._revoked is not None:
            method = (path or b"").decode("utf-8", "replace")
            self._deny_here(stream_id, flags, path, self._revoked(method))
            self._revoked_answers += 1
            if self._revoked_answers == self._limits.denied_calls:  # as a denied caller's
                self._loop.call_soon(self._revocation_over)
            return DROP
        if self._health is not None and (
            path == health_answers.CHECK or path == health_answers.WATCH
        ):
            self._answer_health(stream_id, flags, path)
            return DROP
        if self._authorize is not None:
            decision = self._decisions.get(path)
            if decision is None:
                decision = self._authorize((path or b"").decode("utf-8", "replace"))
                if len(self._decisions) >= _DECISIONS_KEPT:
                    self._decisions.clear()  # a caller trying many methods: decide afresh
                self._decisions[path] = decision
            if not decision.allowed:
                self._deny_here(stream_id, flags, path, decision)
                return DROP
            if decision.audit is not None:
                log_audit(self._peer, decision.audit)
        if self._upstream_last is not None and stream_id > self._upstream_last:
            return rewritten  # the upstream said it will not process it: no call to track
        self._calls[stream_id] = Call(path, bool(flags & END_STREAM))
        return rewritten

    def _deny_here(
        self, stream_id: int, flags: int, path: bytes | None, decision: Decision
    ) -> None:
        """Answer a call the rules deny here, PERMISSION_DENIED with the reason: its HEADERS
        never reach the upstream, and DATA the caller still sends on it is dropped with its
        flow-control credit returned (the walker's DROP), so a denied upload cannot stall
        the connection."""
        method = (path or b"").decode("utf-8", "replace")
        log_denial(self._peer, self._remote, method, decision.reason)
        denied = RequestRefused(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
        call = Call(path, bool(flags & END_STREAM))
        self._answer_here(stream_id, call, denied, logged=True, rule=decision.rule)

    def authorize(self, decide: Callable[[str], Decision] | None) -> None:
        """Decide each call by decide(method) from now on (None: every call is allowed):
        set when the caller is admitted and again when the rules are replaced."""
        self._authorize = decide
        self._decisions = {}

    def _answer_here(
        self,
        stream_id: int,
        call: Call,
        refused: RequestRefused,
        *,
        logged: bool = False,
        rule: str = "",
    ) -> None:
        """Answer a request here (it never reaches the upstream), at a control frame's price:
        the upstream does no work for it (so not at a reset's), but answering costs some."""
        self._spend_control(1)
        if not logged:
            _limited_log.log(
                logging.INFO,
                ("refused", self._route),
                "refused a call from %s: %s",
                self._remote,
                refused.details,
            )
        self._own_to_caller.frames.append(
            self._local_end(stream_id, call, refused.code, refused.details)
        )
        self._send_own_to_caller()
        self._report_call(call, refused.code, refused.details, rule)
        self._count_answer()

    def _answer_health(self, stream_id: int, flags: int, path: bytes) -> None:
        """Answer a grpc.health.v1 call here, from the route's readiness, whoever the caller
        is (its certificate was verified; the rules are not asked). A Watch stays open:
        each change of readiness is sent on it (_health_changed) until it ends.

        Each status message is DATA of the splice's own, which the caller's flow-control
        windows must have room for: the stream's (the caller's initial window, and its
        updates on the stream), and the connection's, which the app shares. A stream with
        no room is refused UNAVAILABLE (its first message) or waits (a Watch's later ones).
        On the connection, the app must not be given window the splice used: the caller's
        connection window updates are relayed less what the messages took, and less a
        reserve (_WINDOW_RESERVE) kept ahead for the next ones (FrameWalker.window_debt).
        A message is not held back for the connection's window, though: a client gives
        it back only as it reads (grpc-go does so after 16 KB), so a health-only
        connection would never hear a change. Until the reserve is built, a message takes
        a few bytes of window the app is not told of (README, "gRPC health", says when
        that can matter)."""
        assert self._health is not None
        self._spend_control(1)  # answered here, at a control frame's price (see _answer_here)
        ended = bool(flags & END_STREAM)
        call = Call(path, ended)
        if self._outbound.initial_window < health_answers.MESSAGE_BYTES:
            refused = RequestRefused(
                grpc.StatusCode.UNAVAILABLE,
                "the caller's initial stream window (SETTINGS_INITIAL_WINDOW_SIZE) leaves "
                "no room for the health answer",
            )
            self._answer_here(stream_id, call, refused)
            return
        serving = self._health.serving
        if path == health_answers.CHECK:
            answer = health_answers.check_answer(stream_id, serving, ended)
            call.bytes_out = health_answers.RESPONSE_BYTES
            self._report_call(call, grpc.StatusCode.OK)
        elif len(self._watches) >= _MAX_WATCHES:
            refused = RequestRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {_MAX_WATCHES} health Watch calls open on one connection",
            )
            self._answer_here(stream_id, call, refused)
            return
        else:
            if not self._watches:
                self._health.watch(self._health_changed)
            watch = self._watches[stream_id] = health_answers.Watch(call, serving)
            watch.sent()
            self._outbound.drop(stream_id, held=True)  # its later frames: left out still
            answer = health_answers.watch_opening(stream_id, serving)
        self._outbound.window_debt += health_answers.MESSAGE_BYTES
        self._own_to_caller.frames.append(answer)
        self._send_own_to_caller()
        self._count_answer()

    @staticmethod
    def _window_for_message(stream_window: int) -> bool:
        """Whether one more status message fits the stream's window (see _answer_health)."""
        return stream_window >= health_answers.MESSAGE_BYTES

    def _health_changed(self, serving: bool) -> None:
        """The route's readiness changed: each Watch on this connection is to be told."""
        for watch in self._watches.values():
            watch.now = serving
        self._send_watches()

    def _held_window(self, stream_id: int, increment: int) -> None:
        """The caller gave a Watch's stream more window."""
        watch = self._watches.get(stream_id)
        if watch is not None:
            watch.given += increment
            self._send_watches()

    def _send_watches(self) -> None:
        """Send each Watch the status it has not heard yet, as far as the caller's windows
        have room (the rest waits for its window updates: _held_window, _to_upstream)."""
        if self._phase >= _DRAINED:
            return
        initial = self._outbound.initial_window
        for stream_id, watch in self._watches.items():
            if watch.told == watch.now or not self._window_for_message(watch.window(initial)):
                continue
            watch.sent()
            self._own_to_caller.frames.append(health_answers.status_message(stream_id, watch.now))
            self._outbound.window_debt += health_answers.MESSAGE_BYTES
        self._send_own_to_caller()

    def _end_watch(self, stream_id: int, code: grpc.StatusCode, details: str) -> bytes:
        """The frames that end one Watch here (NOT_SERVING first, if it fits and is news:
        the connection is ending), reported to the observer."""
        watch = self._watches.pop(stream_id)
        frames = b""
        if watch.told and self._window_for_message(watch.window(self._outbound.initial_window)):
            frames = health_answers.status_message(stream_id, False)
            watch.sent()
            self._outbound.window_debt += health_answers.MESSAGE_BYTES
        self._report_call(watch.call, code, details)
        ended = self._outbound.sender_ended(stream_id)
        self._outbound.release(stream_id)
        return frames + health_answers.watch_end(stream_id, code, details, ended)

    def _end_watches(self, code: grpc.StatusCode, details: str) -> list[bytes]:
        """End every Watch open on this connection (it is ending): their last frames."""
        if not self._watches:
            return []
        assert self._health is not None
        self._health.unwatch(self._health_changed)
        return [self._end_watch(stream_id, code, details) for stream_id in list(self._watches)]

    def _count_answer(self) -> None:
        """One more answer of the splice's own for the caller (see _MAX_UNREAD_ANSWERS)."""
        if self._caller_busy:
            self._answers_while_busy += 1
        unread = max(self._answers_while_busy, len(self._own_to_caller.frames))
        if unread > _MAX_UNREAD_ANSWERS:
            raise BudgetExceeded("requests or PINGs sent without reading the answers")

    def _local_end(self, stream_id: int, call: Call, code: grpc.StatusCode, details: str) -> bytes:
        """The frames that end a call here, as a gRPC server ends one: its status in trailers
        (trailers-only when no response has begun), and, if the caller is still sending,
        RST_STREAM NO_ERROR to tell it to stop (RFC 9113 8.1)."""
        block = status_block(code.value[0], details, trailers_only=not call.answered)
        frames = header_frames(stream_id, True, block)
        if not call.request_ended:
            frames += frame(RST_STREAM, 0, stream_id, _NO_ERROR.to_bytes(4, "big"))
        return frames

    def _request_ended(self, stream_id: int) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            call.request_ended = True

    def _spend_control(self, frames: int) -> None:
        if not self._control.spend(frames):
            raise BudgetExceeded(
                f"more than {self._limits.control_frame_rate} control frames per second"
            )

    def _caller_acked_settings(self) -> bool:
        """The caller acknowledged a SETTINGS frame: the upstream's, relayed (each carries a
        HEADER_TABLE_SIZE of 0, see h2/headerblock.py), or nothing at all, which the upstream
        would take as a protocol error and drop the connection for: left out."""
        self._caller_acks += 1
        if self._caller_acks > self._inbound.settings_relayed:
            return False
        self._requests.table_limited()
        return True

    def _dropped_data(self, length: int) -> None:
        self._credit += length

    def _response_headers(
        self, stream_id: int, flags: int, buffer: bytes, start: int, end: int
    ) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            call.answered = True
        if self._observed:
            grpc_status, http_status = self._responses.status(buffer[start:end])
            if call is not None and http_status is not None:
                call.http_status = http_status
            if flags & END_STREAM:
                self._calls.pop(stream_id, None)
                if call is not None:
                    self._report_call(call, status_code(grpc_status, call.http_status))
                self._call_ended()
            return None
        if self._responses.follows_table:
            self._responses.status(buffer[start:end])
        if flags & END_STREAM:
            self._calls.pop(stream_id, None)
            self._call_ended()
        return None  # responses cross unchanged

    def _upstream_goaway(self, last_stream: int) -> None:
        if self._upstream_last is None or last_stream < self._upstream_last:
            self._upstream_last = last_stream
        # Calls above it will never be answered: the caller learns so from the GOAWAY itself.
        for stream_id in [s for s in self._calls if s > last_stream]:
            self._report_call(
                self._calls.pop(stream_id),
                grpc.StatusCode.UNAVAILABLE,
                f"upstream {self._upstream_name} will not process it (its GOAWAY)",
            )
        if self._phase is _DRAINING and not self._calls:
            self._loop.call_soon(self._close_drained)

    def _upstream_ended(self, stream_id: int) -> None:
        """A response that ended with DATA, without trailers: not a gRPC server's."""
        call = self._calls.pop(stream_id, None)
        if call is not None:
            self._report_call(call, status_code(None, call.http_status))
        self._call_ended()

    def _request_data(self, stream_id: int, data: bytes, start: int, end: int) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            if not call.need_in and not call.prefix_in and end - start >= 5:
                # The usual frame: whole messages from its start. One of them, exactly?
                length = _unpack_u32(data, start + 1)[0]
                if start + 5 + length == end:
                    call.bytes_in += length
                    return
            added, call.need_in, call.prefix_in = message_bytes(
                call.need_in, call.prefix_in, data, start, end
            )
            call.bytes_in += added

    def _response_data(self, stream_id: int, data: bytes, start: int, end: int) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            if not call.need_out and not call.prefix_out and end - start >= 5:
                length = _unpack_u32(data, start + 1)[0]  # (as _request_data)
                if start + 5 + length == end:
                    call.bytes_out += length
                    return
            added, call.need_out, call.prefix_out = message_bytes(
                call.need_out, call.prefix_out, data, start, end
            )
            call.bytes_out += added

    def _caller_reset(self, stream_id: int, error_code: int) -> None:
        call = self._calls.pop(stream_id, None)
        if call is not None:
            self._spend_reset()
            self._report_call(call, grpc.StatusCode.CANCELLED)
            self._call_ended()  # (a reset of a stream that is no call is no activity)
        elif stream_id in self._watches:  # a health Watch answered here, cancelled
            watch = self._watches.pop(stream_id)
            self._report_call(watch.call, grpc.StatusCode.CANCELLED)
            if not self._watches:
                self._health.unwatch(self._health_changed)  # type: ignore[union-attr]

    def _spend_reset(self) -> None:
        """A call in flight ends before its answer, by the caller's doing. Streams opened
        and cancelled before the upstream has finished answering cost it a call each and
        the caller nothing: the "rapid reset" attack (whether the upstream had begun its
        answer or not, and whether the caller reset the stream or made the sidecar do it)."""
        if not self._resets.spend(1):
            raise BudgetExceeded(
                f"more than {self._limits.reset_rate} calls per second cancelled "
                "before their answer (rapid reset)"
            )

    def _upstream_reset(self, stream_id: int, error_code: int) -> None:
        call = self._calls.pop(stream_id, None)
        if call is not None:
            self._report_call(call, reset_status(error_code))
        self._call_ended()

    def _call_ended(self) -> None:
        if not self._calls:
            self._idle_since = self._loop.time()
            if self._phase is _DRAINING:
                # After this read's bytes are written: close() sends what is buffered first.
                self._loop.call_soon(self._close_drained)

    def _caller_ping(self, opaque: bytes) -> None:
        self._own_to_caller.answer_ping(
            opaque, self._loop, self._ack_delay, self._send_own_to_caller
        )
        self._count_answer()

    def _caller_acked_ping(self, opaque: bytes) -> None:
        if opaque == DRAIN_OPAQUE and self._drain_ping is not None:
            self._drain_pinged()

    def _upstream_ping(self, opaque: bytes) -> None:
        self._own_to_upstream.answer_ping(
            opaque, self._loop, self._ack_delay, self._send_own_to_upstream
        )

    def _send_own_to_caller(self) -> None:
        """Send our frames for the caller now, unless a relayed frame is half sent: the rest
        of it is still to come from the upstream, and they go out after it (the timer's
        handle then stays set, so no new timer starts: the walker reaches a frame boundary
        only in `feed`, and both callers of `feed` send what waits once it does)."""
        if self._inbound.at_frame_boundary and not self._caller.is_closing():
            _write(self._caller, self._own_to_caller.take())

    def _send_own_to_upstream(self) -> None:
        if (
            self._upstream is not None
            and self._outbound.at_frame_boundary
            and not self._upstream.is_closing()
        ):
            _write(self._upstream, self._own_to_upstream.take())

    # Timers.

    def _header_overdue(self) -> None:
        """A frame or block was left unfinished at the end of a read header_timeout ago. If
        none is unfinished now, nothing is timed; if frames were completed since, the one
        unfinished now is another: time it afresh."""
        self._header_timer = None
        outbound = self._outbound
        walked = outbound.control_frames + outbound.data_frames
        if outbound.in_frame and walked != self._frames_at_timer:
            self._frames_at_timer = walked
            self._header_timer = self._loop.call_later(
                self._limits.header_timeout, self._header_overdue
            )
            return
        if outbound.in_frame and self._phase < _BROKEN:
            logger.info(
                "caller %s did not finish a frame or header block within %gs: closing",
                self._remote,
                self._limits.header_timeout,
            )
            self._hang_up(
                _PROTOCOL_ERROR,
                "header block or frame not finished in time",
                grpc.StatusCode.CANCELLED,
            )

    def _idle_check(self) -> None:
        """Close a connection that has had no call in flight for idle_timeout (GOAWAY first:
        its client reconnects when it next needs to)."""
        self._idle_timer = None
        if self._phase is not _RELAYING:
            return
        idle = self._loop.time() - self._idle_since
        busy = self._calls or self._watches  # a Watch is a call in flight too
        if busy or idle < self._limits.idle_timeout:
            remaining = self._limits.idle_timeout - (0 if busy else idle)
            self._idle_timer = self._loop.call_later(remaining, self._idle_check)
            return
        logger.debug("closing the idle connection of %s", self._remote)
        self._enter(_DRAINING)
        if self._upstream is None:
            self._close_both()
        else:
            self._close_drained()

    def _cancel_timers(self) -> None:
        self._own_to_caller.cancel()
        self._own_to_upstream.cancel()
        for timer in (self._header_timer, self._first_frame_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._first_frame_timer = self._idle_timer = None
        if self._drain_ping is not None:
            self._drain_ping.cancel()
            self._drain_ping = None
        if self._revocation_timer is not None:
            self._revocation_timer.cancel()
            self._revocation_timer = None

    # Endings.

    def _enter(self, phase: Phase) -> None:
        if phase > self._phase:
            self._phase = phase

    def _report_call(
        self, call: Call, code: grpc.StatusCode, details: str = "", rule: str = ""
    ) -> None:
        """Tell the route's observer how a call ended (nothing to do when none observes)."""
        if not self._observed:
            return
        if self._replay is not None:  # answered before the upstream spoke (see _held_reports)
            self._held_reports.append((call, code, details, rule))
            return
        # The call is its own record (h2/calls.py): what was not needed to relay it is
        # filled in now, and the call is the observer's from here on.
        call.method = method_of(call.path)
        call.remote, call.peer, call.route = self._remote, self._peer, self._route
        call.code, call.details, call.rule = code, details, rule
        self._observer.call_ended(call)

    def _end_calls(self, code: grpc.StatusCode, details: str = "") -> None:
        calls, self._calls = self._calls, {}
        for call in calls.values():
            self._report_call(call, code, details)
        self._end_watches(code, details)  # (their frames can no longer be sent)

    def _goaway(self, error_code: int, debug: bytes = b"") -> bytes:
        """A GOAWAY naming the last stream relayed (never above the upstream's own)."""
        last_stream = self._last_stream
        if self._upstream_last is not None:
            last_stream = min(last_stream, self._upstream_last)
        payload = last_stream.to_bytes(4, "big") + error_code.to_bytes(4, "big") + debug
        return frame(GOAWAY, 0, 0, payload)

    def _goodbye(self, error_code: int, reason: str) -> None:
        """Tell the caller why its connection ends (a GOAWAY with the reason), if it can be
        told: not in the middle of a frame relayed to it."""
        if self._inbound.at_frame_boundary and not self._caller.is_closing():
            debug = reason.encode("ascii", "replace")[:256]
            _write(self._caller, [*self._own_to_caller.take(), self._goaway(error_code, debug)])

    def _end_calls_here(self, code: grpc.StatusCode, details: str) -> None:
        """End every call in flight on the caller's side with this status (the upstream is
        gone, or going), then GOAWAY and close: its client knows at once, and reconnects."""
        calls, self._calls = self._calls, {}
        self._enter(_BROKEN)
        if self._inbound.at_frame_boundary and not self._caller.is_closing():
            chunks = self._own_to_caller.take()
            for stream_id, call in calls.items():
                chunks.append(self._local_end(stream_id, call, code, details))
            chunks += self._end_watches(code, details)
            chunks.append(self._goaway(_NO_ERROR))
            _write(self._caller, chunks)
            for call in calls.values():
                self._report_call(call, code, details)
            self._cancel_timers()
            _close_within(self._caller, _CLOSE_GRACE_SECONDS)
            return
        # In the middle of a frame to the caller: nothing more can be said on this
        # connection; a reset tells its client at once.
        for call in calls.values():
            self._report_call(call, code, details)
        self._end_watches(code, details)
        self._cancel_timers()
        self._caller.abort()

    def _calm_down(self, reason: str) -> None:
        """The caller spent more than a budget allows: GOAWAY ENHANCE_YOUR_CALM with the
        reason, and both connections end (the upstream's calls with its connection)."""
        if self._phase >= _BROKEN:
            return
        _limited_log.log(
            logging.WARNING,
            ("budget", reason, self._route),
            "caller %s (%s) exceeded a budget: %s; closing its connection",
            self._remote,
            self._peer,
            reason,
        )
        self._hang_up(_ENHANCE_YOUR_CALM, reason, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def _hang_up(self, error_code: int, reason: str, code: grpc.StatusCode) -> None:
        """End a caller's connection for what it did: a GOAWAY with the reason (if it can be
        said), its calls cut (the upstream's with its connection), nothing more read from
        it, and a reset shortly after. Not TLS's close: that goes on reading, and
        decrypting, whatever the caller still sends until it answers the close."""
        self._goodbye(error_code, reason)
        self._enter(_BROKEN)
        self._end_calls(code, reason)
        self._cancel_timers()
        if self._upstream is not None:
            self._upstream.abort()
        caller = self._caller
        if not caller.is_closing():
            caller.pause_reading()
            self._loop.call_later(HANG_UP_SECONDS, caller.abort)

    def _stop_relaying(self) -> None:
        """A peer broke HTTP/2 (or the sidecar failed reading it): end both connections."""
        self._enter(_BROKEN)
        self._end_calls(grpc.StatusCode.INTERNAL)
        self._close_both()

    def _close_both(self) -> None:
        self._cancel_timers()
        _close_within(self._caller, _CLOSE_GRACE_SECONDS)
        if self._upstream is not None:
            _close_within(self._upstream, _CLOSE_GRACE_SECONDS)

    def _release(self) -> None:
        """The caller's connection is gone: let go of everything that points back here, so
        that reference counting frees this splice (and its transports' buffers) at once."""
        self._cancel_timers()
        if self._watches:
            self._end_watches(grpc.StatusCode.CANCELLED, "")
        self._outbound.detach()
        self._inbound.detach()
        self._requests = self._responses = None  # type: ignore[assignment]


def _not_serving() -> bool:
    return False


def _failure_text(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    return str(error) or type(error).__name__
