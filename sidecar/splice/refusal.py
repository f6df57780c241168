"""Answering every call on a connection with one gRPC status, without any upstream.

The spliced data plane never parses a caller's HTTP/2 beyond frame boundaries
and header blocks. A connection it will not splice (a caller the allowlist
denies, or one whose upstream cannot be reached) is instead handed to a
`Refusal`, which speaks HTTP/2 through the h2 library and answers each call
with a trailers-only response: the status and a message saying why, exactly
as a gRPC server would. Nothing reaches the upstream.

A refusal for PERMISSION_DENIED keeps the connection for a while (the caller's
next calls get the same answer, as from any gRPC server). One for UNAVAILABLE
answers the calls already sent, then sends GOAWAY so that the caller's next
call opens a new connection, which tries the upstream again. A call that comes
only later (a client reconnected at once, with no call to make, and kept the
connection) is not answered with what was true when the connection began: it
is refused unprocessed (RST_STREAM REFUSED_STREAM, then GOAWAY), which gRPC
clients retry on a new connection by themselves. "Later" is more than
_FRESH_SECONDS after the caller acknowledged the refusal's SETTINGS: a gRPC
client may wait for the server's SETTINGS (which the refusal sends, the upstream
having sent none) before it sends the calls that opened the connection, and
then sends them right after the acknowledgement.

Such a caller is owed little, and h2 costs some 20-30 us a frame, so each
connection gets a bounded amount of work (`Limits`): whole frames are handed to
h2 a few dozen per loop turn (refusal_intake.py), the rest waiting with reading
paused; the frames, bytes and calls of the whole connection are budgeted, as
are its lifetime and the time it may go without starting a call; what is held
of an unfinished frame or header block is capped; answers the caller does not
read stop the work. A caller past a budget for a flood gets GOAWAY
(ENHANCE_YOUR_CALM) and is hung up on; one simply done (its calls answered, its
lifetime or idle time over) gets RFC 9113's graceful pair of GOAWAYs, so that
the calls it sent meanwhile are answered too, and a moment to close first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from sidecar.auth.policy import Decision
from sidecar.config.limits import Limits
from sidecar.dataplane import log_denial
from sidecar.h2.frames import GOAWAY_GRACEFUL
from sidecar.h2.headerblock import grpc_message
from sidecar.observe.calls import NO_OBSERVER, CallObserver, CallRecord
from sidecar.observe.loglimit import LogLimiter
from sidecar.observe.logs import escape
from sidecar.splice import health
from sidecar.splice.own_frames import HANG_UP_SECONDS
from sidecar.splice.refusal_intake import FRAMES_PER_TURN, MAX_FRAME, Intake, Overrun

logger = logging.getLogger("sidecar.server")


# Likewise a line per connection cut, for a caller that reconnects as fast as it is cut.
_cuts = LogLimiter(logger)

# Streams h2 lets a caller open at once: calls are answered (and closed) as a turn's
# frames are, so no more than a turn's frames are ever open, and h2 takes more as a
# connection error. Also how many calls past its budget a caller may have sent before
# it read the GOAWAY, and are still answered.
_MAX_STREAMS = 100
assert FRAMES_PER_TURN < _MAX_STREAMS
# Answers waiting in the write buffer beyond which no more frames are processed: a
# caller sending PINGs without reading the ACKs is not read either until it does. (The
# kernel's socket buffers take megabytes first, more than the default budgets let a
# connection earn in answers: this holds for budgets set large, and when the splice,
# not the listener, owns the connection and does not pause reading for writes.)
_UNREAD_ANSWERS = 64 * 1024
_UNREAD_RETRY_SECONDS = 0.05
# After a GOAWAY, how long a caller simply done has to read it and close (its input is
# read and dropped meanwhile, up to _LINGER_INPUT), and then how long any caller has
# to read what is left before the connection is aborted.
_LINGER_SECONDS = 1.0
_LINGER_INPUT = 64 * 1024
# What a refused connection lets wait unread in the kernel (its receive buffer; OpenSSL
# holds at most a record more, see splice/tls_transport.py). The refusal reads a turn's
# frames at a time and pauses between turns, and a caller flooding it would fill the
# buffer for as long as the connection lasts.
_KERNEL_RECEIVE_BUFFER = 64 * 1024
_DRAIN_PING = b"goodbye!"
# How long after a caller acknowledged an UNAVAILABLE refusal's SETTINGS its calls are still
# answered with the reason (see refuse_later_calls): the calls a gRPC client held back until
# it had our SETTINGS come at once.
_FRESH_SECONDS = 0.1
_HEALTH_WATCH = health.WATCH.decode()
_HEALTH_METHODS = (health.CHECK.decode(), _HEALTH_WATCH)


def told(details: str) -> Callable[[str], Decision]:
    """A refusal's `decide` when every call is told the same (an upstream that cannot be
    reached, a listener full)."""
    decision = Decision(False, details)
    return lambda method: decision


def _read_little(transport: asyncio.Transport) -> None:
    """Keep what waits unread on a refused connection small (see _KERNEL_RECEIVE_BUFFER)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # the connection is gone already
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _KERNEL_RECEIVE_BUFFER)


class Refusal:
    """One caller connection on which every call gets `code` and `decide(method).reason`
    (a denial's `.rule` is counted by the observer), within
    the budgets of `limits` (denied_calls, denied_lifetime, denied_frames, denied_bytes,
    denied_idle_timeout, max_header_block, max_header_list_size)."""

    def __init__(
        self,
        transport: asyncio.Transport,
        code: grpc.StatusCode,
        decide: Callable[[str], Decision],
        *,
        peer: str,
        remote: str,
        route: str | None,
        goaway: bool,
        limits: Limits = Limits(),  # noqa: B008  (frozen: one shared default is safe)
        observer: CallObserver = NO_OBSERVER,
        serving: Callable[[], bool] | None = None,
    ) -> None:
        self._transport = transport
        self._code = code
        self._decide = decide
        self._peer, self._remote, self._route = peer, remote, route
        self._goaway = goaway
        self._limits = limits
        self._observer = observer
        # grpc_health: sidecar: health calls get the route's readiness (see _answer_health).
        self._serving = serving
        self._loop = asyncio.get_running_loop()
        self._connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self._connection.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _MAX_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            },
        )
        # Enforced from the first request, not only once the caller acknowledges them.
        self._connection.decoder.max_header_list_size = limits.max_header_list_size
        self._connection.max_inbound_frame_size = MAX_FRAME
        self._connection.initiate_connection()
        self._flush()
        self._intake = Intake(limits)
        _read_little(transport)
        self._dropped = 0  # bytes received after the GOAWAY
        self._calls = 0
        self._last_answered = 0
        # Calls after the caller acknowledged our SETTINGS are refused unprocessed (see
        # refuse_later_calls).
        self._refuse_later = False
        self._settings_acked: float | None = None  # when the caller acknowledged them
        self._refused_new_call = False
        self._refused_new_calls = 0  # calls refused unprocessed (see calls_seen)
        self._turn: asyncio.Handle | None = None  # the next turn's work, when scheduled
        self._paused = False
        self._draining: str | None = None  # why, once the first GOAWAY of two is out
        self._ended = False  # the last GOAWAY sent (or the connection lost): input dropped
        self._closes = self._loop.time() + limits.denied_lifetime
        self._last_call = self._loop.time()  # or the connection's start
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            min(self._closes, self._last_call + limits.denied_idle_timeout), self._on_timer
        )

    def feed(self, data: bytes) -> None:
        """Take what the caller sent: answered at once up to a turn's budget, the rest on
        the next turns; a caller breaking HTTP/2 or a budget loses the connection."""
        if self._ended:
            # After GOAWAY: frames for calls already answered, or calls after the last one
            # answered (the caller retries those elsewhere). Dropped unread, while they
            # are few (the caller's close is seen); a caller still flooding is not read.
            self._dropped += len(data)
            if self._dropped > _LINGER_INPUT and not self._transport.is_closing():
                self._pause()
            return
        try:
            self._intake.add(data)
        except Overrun as overrun:
            self._end(overrun.error_code, overrun.reason)
            return
        if self._turn is not None:  # frames are waiting already: read no more meanwhile
            self._pause()
            return
        self._work()

    @property
    def calls_seen(self) -> int:
        """Calls answered here (and refused unprocessed)."""
        return self._calls + self._refused_new_calls

    def refuse_later_calls(self) -> None:
        """Answer with the reason only the calls that come before, or just after, the caller's
        acknowledgement of our SETTINGS; refuse later ones unprocessed, to be retried on a
        new connection (the upstream may be back by then)."""
        self._refuse_later = True

    def connection_lost(self) -> None:
        """The connection is gone: no more turns, no more timers."""
        self._ended = True
        self._intake.clear()
        for handle in (self._turn, self._timer):
            if handle is not None:
                handle.cancel()
        self._turn = self._timer = None

    def caller_busy(self) -> None:
        """The caller is not reading: its answers wait, and so does what it sends."""
        self._transport.pause_reading()

    def caller_ready(self) -> None:
        if not self._transport.is_closing():
            self._transport.resume_reading()

    def drain(self) -> None:
        """The sidecar is stopping: a refused caller has nothing in flight to wait for."""
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    # Work, a turn at a time.

    def _work(self) -> None:
        self._turn = None
        if self._ended:
            return
        if self._transport.get_write_buffer_size() > _UNREAD_ANSWERS:
            # The caller does not read its answers: no more work for it until it does
            # (its idle time and lifetime run on).
            self._pause()
            self._turn = self._loop.call_later(_UNREAD_RETRY_SECONDS, self._work)
            return
        try:
            chunk = self._intake.take()
        except Overrun as overrun:
            self._end(overrun.error_code, overrun.reason)
            return
        if chunk:
            self._receive(chunk)
            if self._ended:
                return
        if self._intake.waiting:
            self._pause()
            self._turn = self._loop.call_soon(self._work)
        elif self._paused and not self._transport.is_closing():
            self._paused = False
            self._transport.resume_reading()

    def _receive(self, chunk: bytes) -> None:
        acked = self._settings_acked
        fresh = (
            not self._refuse_later or acked is None or self._loop.time() - acked < _FRESH_SECONDS
        )
        try:
            events = self._connection.receive_data(chunk)
        except h2.exceptions.ProtocolError as error:
            # h2 has queued its GOAWAY (with the error code) already.
            self._end(None, f"broke HTTP/2: {escape(str(error))}", logging.INFO)
            return
        for event in events:
            if self._ended:
                break
            if isinstance(event, h2.events.RequestReceived):
                if not fresh:
                    self._refuse_unprocessed(event.stream_id, event.headers)
                else:
                    self._answer(event.stream_id, event.headers, event.stream_ended is not None)
            elif isinstance(event, h2.events.DataReceived):
                # Discard, but keep the caller's flow-control window open.
                with contextlib.suppress(h2.exceptions.ProtocolError):  # closed in this read
                    self._connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            elif isinstance(event, h2.events.SettingsAcknowledged):
                self._settings_acked = self._loop.time()
            elif isinstance(event, h2.events.PingAckReceived):
                if self._draining is not None and event.ping_data == _DRAIN_PING:
                    self._end(h2.errors.ErrorCodes.NO_ERROR, self._draining)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._end(None, "")  # the caller's GOAWAY: it is leaving
        if self._goaway and (self._last_answered or self._refused_new_call) and not self._ended:
            # Calls sent after these are not processed: the caller retries them elsewhere.
            self._end(h2.errors.ErrorCodes.NO_ERROR, "")
        self._flush()

    def _answer(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        started = time.monotonic()
        method = next((value for name, value in headers if name == b":path"), b"").decode(
            "utf-8", "replace"
        )
        if self._serving is not None and method in _HEALTH_METHODS:
            self._answer_health(stream_id, method, ended, started)
            return
        decision = self._decide(method)
        details = decision.reason
        if self._code == grpc.StatusCode.PERMISSION_DENIED:
            log_denial(self._peer, self._remote, method, details)
        code = self._code
        try:
            self._connection.send_headers(
                stream_id,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", str(code.value[0]).encode()),
                    (b"grpc-message", grpc_message(details)),
                ],
                end_stream=True,
            )
        except h2.exceptions.ProtocolError:
            # The caller reset the call in the same read (a deadline already past, say; h2
            # forgets a closed stream once a later one opens), or closed the connection in
            # it (its GOAWAY): the answer has no one to go to.
            code, ended = grpc.StatusCode.CANCELLED, True
        if not ended:
            # The caller may still be sending; tell it to stop (RFC 9113 8.1). Its
            # END_STREAM may already be in this read, which closed the stream.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._connection.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        self._observer.call_ended(
            CallRecord(
                method=method,
                started=started,
                remote=self._remote,
                peer=self._peer,
                code=code,
                route=self._route,
                details=details,
                rule=decision.rule if code is grpc.StatusCode.PERMISSION_DENIED else "",
            )
        )
        self._answered(stream_id)

    def _answer_health(self, stream_id: int, method: str, ended: bool, started: float) -> None:
        """A grpc.health.v1 call, answered with the route's readiness (splice/health.py has
        the whole story).

        A Check gets its status. A Watch on a connection refused because the app cannot
        be reached ends UNAVAILABLE with the reason and no status: a gRPC client waits
        (backs off) before it watches again, where one that heard a status would watch
        again at once, on a new connection each time (a spin). A Watch of a caller the
        rules admit to nothing hears the status and stays open until the connection ends
        (denied_lifetime): it is not told of changes meanwhile, and the client watches
        again on a new connection then."""
        assert self._serving is not None
        status: list[tuple[bytes, bytes]] | None = [(b"grpc-status", b"0")]
        code, details = grpc.StatusCode.OK, ""
        answer = True
        if method == _HEALTH_WATCH and self._code is grpc.StatusCode.UNAVAILABLE:
            code, details = grpc.StatusCode.UNAVAILABLE, self._decide(method).reason
            answer = False
        elif method == _HEALTH_WATCH:
            status = None  # open until the connection ends
        bytes_out = 0
        try:
            if answer:
                self._connection.send_headers(
                    stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                )
                self._connection.send_data(stream_id, health.message(self._serving()))
                bytes_out = health.RESPONSE_BYTES
                if status is not None:
                    self._connection.send_headers(stream_id, status, end_stream=True)
            else:
                self._connection.send_headers(
                    stream_id,
                    [(b":status", b"200"), (b"content-type", b"application/grpc"),
                     (b"grpc-status", str(code.value[0]).encode()),
                     (b"grpc-message", grpc_message(details))],
                    end_stream=True,
                )  # fmt: skip
        except (h2.exceptions.ProtocolError, h2.exceptions.FlowControlError):
            # Reset or closed in this read (see _answer), or a caller that gave the
            # stream no window: it gets no answer.
            code, ended, bytes_out = grpc.StatusCode.CANCELLED, True, 0
        if not ended and status is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._connection.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        self._observer.call_ended(
            CallRecord(method, started, self._remote, self._peer, code, bytes_out=bytes_out,
                       route=self._route, details=details)
        )  # fmt: skip
        self._answered(stream_id)

    def _answered(self, stream_id: int) -> None:
        """One more call answered: within the connection's budget of calls?"""
        self._last_answered = stream_id
        self._calls += 1
        self._last_call = self._loop.time()
        if self._goaway or self._calls < self._limits.denied_calls:
            return
        if self._draining is None:
            self._drain(f"{self._calls} calls answered")
        elif self._calls >= self._limits.denied_calls + _MAX_STREAMS:
            # More than a client keeping to SETTINGS_MAX_CONCURRENT_STREAMS can have sent
            # before it read the GOAWAY: it ignores it.
            self._end(h2.errors.ErrorCodes.NO_ERROR, self._draining)

    def _refuse_unprocessed(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        method = next((value for name, value in headers if name == b":path"), b"")
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._connection.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        self._refused_new_call = True
        self._refused_new_calls += 1
        self._observer.call_ended(
            CallRecord(
                method=method.decode("utf-8", "replace"),
                started=time.monotonic(),
                remote=self._remote,
                peer=self._peer,
                code=grpc.StatusCode.UNAVAILABLE,
                route=self._route,
                details="not processed (REFUSED_STREAM): the client retries it on a new "
                "connection, which tries the upstream again",
            )
        )

    # The end: GOAWAY, linger, close.

    def _on_timer(self) -> None:
        now = self._loop.time()
        idle_ends = self._last_call + self._limits.denied_idle_timeout
        if now >= self._closes:
            self._drain(f"open {self._limits.denied_lifetime:g}s")
        elif now >= idle_ends:
            self._drain(f"no call for {self._limits.denied_idle_timeout:g}s")
        else:  # a call since: the idle time starts over
            self._timer = self._loop.call_at(min(self._closes, idle_ends), self._on_timer)

    def _drain(self, why: str) -> None:
        """End a connection whose calls may be in flight, as RFC 9113 6.8 describes: a
        GOAWAY naming no stream tells the caller to start no more calls here, and a PING
        times the round trip; calls it sent before it read the GOAWAY are still answered,
        and once the PING's ACK is back (or after the linger) the last GOAWAY names the
        last of them. gRPC clients retry a call a GOAWAY leaves out once only: ending at
        once would turn part of a burst of calls into UNAVAILABLE instead of its answer."""
        if self._draining is not None or self._ended:
            return
        self._draining = why
        self._flush()
        if not self._transport.is_closing():
            self._transport.write(GOAWAY_GRACEFUL)  # h2 has no first GOAWAY of two
        self._connection.ping(_DRAIN_PING)
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(
            _LINGER_SECONDS, self._end, h2.errors.ErrorCodes.NO_ERROR, why
        )

    def _end(
        self, error_code: h2.errors.ErrorCodes | None, why: str, level: int | None = None
    ) -> None:
        """GOAWAY with error_code (None: h2 has queued its own, or the caller left) naming
        the last call answered, then the close; `why` is logged unless empty (at INFO
        for a caller simply done, else WARNING unless `level` says otherwise).

        A caller simply done (NO_ERROR) has a moment to read the GOAWAY and close first,
        its input read and dropped meanwhile, so that closing with input unread (which
        makes the kernel reset the connection) does not cut what it has still to read;
        then TLS's close. A caller that left (its GOAWAY) gets TLS's close at once. Any
        other is hung up on: nothing more is read from it, and the connection is reset
        shortly after its GOAWAY went out (TLS's close would go on reading, and
        decrypting, whatever it still sends until it answers the close)."""
        if self._ended:
            return
        self._ended = True
        if why:
            if level is None:
                done = error_code == h2.errors.ErrorCodes.NO_ERROR
                level = logging.INFO if done else logging.WARNING
            _cuts.log(level, (self._peer, level), "closing the connection of %s (%s): %s",
                      self._peer, self._remote, why)  # fmt: skip
        if error_code is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._connection.close_connection(error_code, last_stream_id=self._last_answered)
        self._flush()
        self._intake.clear()
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if error_code is None and not why:
            self._close()
            return
        if error_code != h2.errors.ErrorCodes.NO_ERROR:
            if not self._transport.is_closing():
                self._pause()
                self._timer = self._loop.call_later(HANG_UP_SECONDS, self._transport.abort)
            return
        if self._paused and not self._transport.is_closing():
            self._paused = False
            self._transport.resume_reading()  # to see the caller close
        self._timer = self._loop.call_later(_LINGER_SECONDS, self._close)

    def _close(self) -> None:
        """Close once what is buffered is sent; abort if the caller does not read it soon."""
        self._transport.close()
        self._timer = self._loop.call_later(_LINGER_SECONDS, self._transport.abort)

    def _pause(self) -> None:
        # Every time: the listener resumes reading when the write buffer drains.
        self._paused = True
        self._transport.pause_reading()

    def _flush(self) -> None:
        outgoing = self._connection.data_to_send()
        if outgoing and not self._transport.is_closing():
            self._transport.write(outgoing)
