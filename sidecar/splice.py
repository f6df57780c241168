"""The spliced data plane: one caller connection joined to one upstream connection.

Bytes cross as they come. A `FrameWalker` per direction finds the frame
boundaries; only header blocks are read (requests are filtered and get the
sidecar's user-agent; trailers, or a non-gRPC response's :status, give the
status for the access log) and DATA payloads are walked for message sizes when
the access log is on. PINGs are answered by the splice on the side they come
from (a PING is about one connection; relaying it would cost a crossing each
way), the answer riding with the next bytes relayed that way. Everything else (DATA,
flow control, RST_STREAM, GOAWAY, SETTINGS but for the table size) crosses
unchanged, so gRPC's semantics hold exactly: deadlines, cancellation, half-close,
flow control, trailers and message sizes are the two peers' own.

Until the upstream has sent its first bytes, the caller's bytes are also kept:
if the upstream cannot be reached (connection refused, a TLS failure, closed
before speaking), a `Refusal` replays them and answers each call UNAVAILABLE
with the reason. Backpressure is end to end: when one side's write buffer is
full, the other side stops being read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc

from sidecar.accesslog import CallRecord, access_logger, log_call
from sidecar.frames import ACK, END_STREAM, GOAWAY, PING, FrameError, FrameWalker, frame
from sidecar.headerblock import HeaderBlockError, RequestBlocks, ResponseBlocks
from sidecar.refusal import Refusal

logger = logging.getLogger("sidecar.server")

# Caller bytes kept for a replay until the upstream speaks; past this, the caller
# is not read until it does (or fails).
_REPLAY_LIMIT = 256 * 1024
# Per transport: past this much unsent data, the other side stops being read.
WRITE_BUFFER_HIGH = 256 * 1024
# How long a closing connection may take to send what is buffered for a peer.
_CLOSE_GRACE_SECONDS = 10.0
# PING ACKs queued for a caller that is not reading, before its connection is cut.
_MAX_ACKS_WHILE_BUSY = 1000
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

_STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
# How a gRPC client reads an RST_STREAM error code (the gRPC HTTP/2 spec's table).
_STATUS_BY_RESET = {
    0x0: grpc.StatusCode.INTERNAL,  # NO_ERROR before trailers
    0x7: grpc.StatusCode.UNAVAILABLE,  # REFUSED_STREAM
    0x8: grpc.StatusCode.CANCELLED,  # CANCEL
    0xB: grpc.StatusCode.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: grpc.StatusCode.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}
# How a gRPC client reads a response that ends without grpc-status (a server that is
# not gRPC, or a proxy's error page): "HTTP to gRPC Status Code Mapping" in gRPC's docs.
_STATUS_BY_HTTP = {
    b"400": grpc.StatusCode.INTERNAL,
    b"401": grpc.StatusCode.UNAUTHENTICATED,
    b"403": grpc.StatusCode.PERMISSION_DENIED,
    b"404": grpc.StatusCode.UNIMPLEMENTED,
    b"429": grpc.StatusCode.UNAVAILABLE,
    b"502": grpc.StatusCode.UNAVAILABLE,
    b"503": grpc.StatusCode.UNAVAILABLE,
    b"504": grpc.StatusCode.UNAVAILABLE,
}
# An upstream that accepted the connection (and, for TLS, finished the handshake)
# and closed it without a byte: for TLS 1.3, typically a refused client certificate.
_CLOSED_BEFORE_SPEAKING = ConnectionError(
    "the connection was closed before the upstream spoke (after any TLS handshake)"
)
# "Shutting down; finish what you started, start nothing new" (RFC 9113 6.8).
_GOAWAY_GRACEFUL = frame(GOAWAY, 0, 0, (0x7FFFFFFF).to_bytes(4, "big") + bytes(4))

# Opens the upstream connection with the protocol from the factory given.
Connector = Callable[
    [Callable[[], asyncio.Protocol]], Awaitable[tuple[asyncio.BaseTransport, object]]
]
# Turns a failure to reach the upstream into the details callers get.
Describer = Callable[[BaseException | None], Awaitable[str]]


class _Call:
    """One gRPC call (an HTTP/2 stream) in flight, as the access log needs it."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "http_status",
        "method",
        "need_in",
        "need_out",
        "prefix_in",
        "prefix_out",
        "started",
    )  # fmt: skip

    def __init__(self, method: str) -> None:
        self.method = method
        self.started = time.monotonic()
        self.bytes_in = self.bytes_out = 0
        self.http_status: bytes | None = None  # the response's :status, once it came
        # Message framing state per direction: body bytes still to skip, and the
        # part of a 5-byte message prefix seen so far.
        self.need_in = self.need_out = 0
        self.prefix_in = self.prefix_out = b""


def _message_bytes(
    need: int, prefix: bytes, data: bytes, start: int, end: int
) -> tuple[int, int, bytes]:
    """Walk gRPC message framing (flag byte, 4-byte length, body) over data[start:end]:
    return the body bytes of the messages begun there, and the framing state after."""
    total, position = 0, start
    while position < end:
        if need:
            taken = min(need, end - position)
            need -= taken
            position += taken
        elif not prefix and end - position >= 5:
            need = int.from_bytes(data[position + 1 : position + 5], "big")
            total += need
            position += 5
        else:
            taken = min(5 - len(prefix), end - position)
            prefix += bytes(data[position : position + taken])
            position += taken
            if len(prefix) == 5:
                need = int.from_bytes(prefix[1:], "big")
                total += need
                prefix = b""
    return total, need, prefix


def _status_code(grpc_status: bytes | None, http_status: bytes | None) -> grpc.StatusCode:
    """The status a gRPC client reads from a response's grpc-status, or else its :status."""
    if grpc_status is not None:
        if grpc_status.isdigit():
            return _STATUS_BY_CODE.get(int(grpc_status), grpc.StatusCode.UNKNOWN)
        return grpc.StatusCode.UNKNOWN
    return _STATUS_BY_HTTP.get(http_status or b"", grpc.StatusCode.UNKNOWN)


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


class _OwnFrames:
    """Frames of the splice's own (PING answers, GOAWAY) for one side, waiting for the next
    frame boundary of the bytes relayed that way, and the timer that sends PING answers
    which found no relayed bytes to ride with (see _ACK_DELAY_SECONDS)."""

    __slots__ = ("frames", "timer")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None

    def take(self) -> list[bytes]:
        """The frames, now sent (with relayed bytes or on their own)."""
        self.cancel()
        frames, self.frames = self.frames, []
        return frames

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _UpstreamProtocol(asyncio.Protocol):
    """The upstream connection's events, handed to its Splice."""

    def __init__(self, splice: Splice) -> None:
        self._splice = splice

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH)  # type: ignore[attr-defined]
        self._splice.upstream_made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._splice.from_upstream(data)

    def eof_received(self) -> bool:
        return False  # close; HTTP/2 has no use for a half-closed connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.upstream_lost(exc)

    def pause_writing(self) -> None:
        self._splice.pause_caller("upstream busy")

    def resume_writing(self) -> None:
        self._splice.resume_caller("upstream busy")


class Splice:
    """A caller's connection relayed frame by frame over its own upstream connection."""

    def __init__(
        self,
        caller: asyncio.Transport,
        connect: Connector,
        describe_failure: Describer,
        *,
        peer: str,
        remote: str,
        route: str | None,
        user_agent: bytes,
        ack_delay: float = _ACK_DELAY_SECONDS,
    ) -> None:
        self._caller = caller
        self._upstream: asyncio.Transport | None = None
        self._describe_failure = describe_failure
        self._peer, self._remote, self._route = peer, remote, route
        self._replay: list[bytes] | None = []  # the caller's bytes, until the upstream speaks
        self._replay_size = 0
        self._refusal: Refusal | None = None
        self._failing = False
        self._broken = False  # a peer broke HTTP/2: nothing more is relayed
        self._caller_busy = False  # the caller's write buffer is full
        self._acks_while_busy = 0
        self._failure: asyncio.Task[None] | None = None
        self._pauses: set[str] = set()
        # Calls in flight by stream; without the access log only the keys are kept
        # (the drain waits for them).
        self._calls: dict[int, _Call | None] = {}
        self._last_stream = 0
        # The lowest last-stream id of the upstream's GOAWAYs (relayed to the caller): the
        # sidecar's own GOAWAYs must not name a higher one (RFC 9113 6.8), and streams
        # above it are ignored by the upstream, so they are not tracked as calls.
        self._upstream_last: int | None = None
        self._draining = False
        self._drain_closed = False
        self._own_to_caller = _OwnFrames()
        self._own_to_upstream = _OwnFrames()
        self._ack_delay = ack_delay
        self._done = False
        self._log = access_logger.isEnabledFor(logging.INFO)
        self._requests = RequestBlocks(user_agent)
        self._responses = ResponseBlocks()
        self._outbound = FrameWalker(
            self._request_headers,
            preface=True,
            data=self._request_data if self._log else None,
            reset=self._caller_reset,
            ping=self._caller_ping,
            settings_acked=self._requests.table_limited,  # the client acks the upstream's
        )
        self._inbound = FrameWalker(
            self._response_headers,
            preface=False,
            data=self._response_data if self._log else None,
            ended=self._upstream_ended,
            reset=self._upstream_reset,
            ping=self._upstream_ping,
            settings_acked=self._responses.table_limited,
            goaway=self._upstream_goaway,
        )
        self._loop = asyncio.get_running_loop()
        self._connecting = self._loop.create_task(self._connect(connect))

    # The caller's side (called by the listener's protocol).

    def from_caller(self, data: bytes) -> None:
        if self._refusal is not None:
            self._refusal.feed(data)
            return
        if self._replay is not None:
            self._replay.append(data)
            self._replay_size += len(data)
            if self._replay_size > _REPLAY_LIMIT:
                self.pause_caller("upstream silent")
            if self._upstream is None:
                return  # relayed from the replay once connected
        elif self._upstream is None:
            return  # the upstream is gone and the caller's connection is closing
        self._to_upstream(data)

    def caller_lost(self) -> None:
        self._connecting.cancel()
        self._cancel_ack_timers()
        if self._refusal is not None:
            self._refusal.connection_lost()
        self._end_calls(grpc.StatusCode.CANCELLED)
        if self._upstream is not None:
            # Nothing more can reach the caller: the upstream's calls end now, and an
            # upstream that stopped reading cannot hold its connection open.
            self._upstream.abort()
        self._done = True

    def caller_busy(self) -> None:
        """The caller is not reading: stop reading the upstream (the caller is still read:
        it may be blocked sending until it is, and HTTP/2 flow control bounds its DATA)."""
        self._caller_busy = True
        if self._upstream is not None:
            self._upstream.pause_reading()

    def caller_ready(self) -> None:
        self._caller_busy = False
        self._acks_while_busy = 0
        if self._upstream is not None:
            self._upstream.resume_reading()

    def pause_caller(self, reason: str) -> None:
        if not self._pauses:
            self._caller.pause_reading()
        self._pauses.add(reason)

    def resume_caller(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        self._pauses.remove(reason)
        if not self._pauses and not self._caller.is_closing():
            self._caller.resume_reading()

    def drain(self) -> None:
        """Tell the caller to start no new calls; close once those in flight are done."""
        self._draining = True
        if self._refusal is not None or self._upstream is None:
            self._close_both()
            return
        if not self._calls:
            self._close_drained()
            return
        if self._upstream_last is None:  # else the caller already has a GOAWAY, and a lower one
            self._own_to_caller.frames.append(_GOAWAY_GRACEFUL)
            self._send_own_to_caller()

    def _close_drained(self) -> None:
        """The drain's last word: a GOAWAY naming the last stream relayed, so that a call
        the caller started after all (before it saw the first GOAWAY) is known to it as
        not processed and is retried elsewhere, then the close."""
        if self._drain_closed:  # a stream's end and its reset can both schedule this
            return
        if self._calls:  # a call started in the same loop turn as the last one ended
            return  # (its own end schedules this again)
        self._drain_closed = True
        if self._inbound.at_frame_boundary and not self._caller.is_closing():
            last_stream = self._last_stream
            if self._upstream_last is not None:
                last_stream = min(last_stream, self._upstream_last)
            last = last_stream.to_bytes(4, "big") + bytes(4)  # NO_ERROR
            _write(self._caller, [*self._own_to_caller.take(), frame(GOAWAY, 0, 0, last)])
        self._close_both()

    def abort(self) -> None:
        """End both connections now (the drain grace is over)."""
        self._caller.abort()
        if self._upstream is not None:
            self._upstream.abort()

    # The upstream's side.

    async def _connect(self, connect: Connector) -> None:
        try:
            await connect(lambda: _UpstreamProtocol(self))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # refused, unreachable, TLS: every caller hears why
            await self._fail(error)

    def upstream_made(self, transport: asyncio.Transport) -> None:
        """Connected: relay what the caller sent so far (before any upstream byte can arrive)."""
        if self._done:
            transport.close()
            return
        self._upstream = transport
        for chunk in self._replay or ():
            if self._broken:
                break
            self._to_upstream(chunk)

    def from_upstream(self, data: bytes) -> None:
        if self._broken:
            return
        if self._replay is not None:  # the upstream speaks: no replay will be needed
            self._replay = None
            self.resume_caller("upstream silent")
        chunks = self._walked(self._inbound, data, from_upstream=True)
        if chunks is None:
            return
        if self._own_to_caller.frames and self._inbound.at_frame_boundary:
            chunks += self._own_to_caller.take()
        _write(self._caller, chunks)

    def upstream_lost(self, exc: BaseException | None) -> None:
        if self._done or self._refusal is not None:
            return
        self._upstream = None
        if self._replay is not None:  # lost before it spoke: the calls can still be answered
            self._failure = asyncio.get_running_loop().create_task(
                self._fail(exc or _CLOSED_BEFORE_SPEAKING)
            )
            return
        self._end_calls(grpc.StatusCode.UNAVAILABLE)
        _close_within(self._caller, _CLOSE_GRACE_SECONDS)  # what is buffered goes first

    async def _fail(self, error: BaseException) -> None:
        if self._failing:  # a timeout and a close can both report one failure
            return
        self._failing = True
        details = await self._describe_failure(error)
        if self._done:
            return
        self._refusal = Refusal(
            self._caller,
            grpc.StatusCode.UNAVAILABLE,
            lambda method: details,
            peer=self._peer,
            remote=self._remote,
            route=self._route,
            goaway=True,
        )
        replay, self._replay = self._replay or [], None
        self._calls.clear()
        self._cancel_ack_timers()
        self._own_to_caller.frames.clear()  # the refusal answers the replayed PINGs itself
        self.resume_caller("upstream silent")
        for chunk in replay:
            self._refusal.feed(chunk)

    # Frames.

    def _to_upstream(self, data: bytes) -> None:
        if self._broken:
            return
        chunks = self._walked(self._outbound, data, from_upstream=False)
        if chunks is None:
            return
        assert self._upstream is not None
        if self._own_to_upstream.frames and self._outbound.at_frame_boundary:
            chunks += self._own_to_upstream.take()
        _write(self._upstream, chunks)

    def _walked(
        self, walker: FrameWalker, data: bytes, *, from_upstream: bool
    ) -> list[bytes | memoryview] | None:
        """The bytes to send on for `data`; None when its sender broke HTTP/2, or the
        sidecar failed reading it: then both connections end, and only they."""
        try:
            return walker.feed(data)
        except (FrameError, HeaderBlockError) as error:
            if from_upstream:  # the operator's own app: worth a warning
                logger.warning(
                    "upstream broke HTTP/2 on a connection for %s: %s", self._remote, error
                )
            else:
                logger.info("caller %s broke HTTP/2: %s", self._remote, error)
        except Exception:
            logger.exception("internal error relaying for %s", self._remote)
        self._stop_relaying()
        return None

    def _request_headers(
        self, stream_id: int, flags: int, buffer: bytes, start: int, end: int
    ) -> bytes:
        rewritten, path = self._requests.rewrite(buffer[start:end])
        if self._upstream_last is not None and stream_id > self._upstream_last:
            return rewritten  # the upstream said it will not process it: no call to track
        if stream_id > self._last_stream:
            self._last_stream = stream_id
            self._calls[stream_id] = (
                _Call(path.decode("utf-8", "replace") if path else "-") if self._log else None
            )
        return rewritten

    def _response_headers(
        self, stream_id: int, flags: int, buffer: bytes, start: int, end: int
    ) -> None:
        if self._log:
            call = self._calls.get(stream_id)
            grpc_status, http_status = self._responses.status(buffer[start:end])
            if call is not None and http_status is not None:
                call.http_status = http_status
            if flags & END_STREAM:
                self._calls.pop(stream_id, None)
                if call is not None:
                    self._log_call(call, _status_code(grpc_status, call.http_status))
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
            call = self._calls.pop(stream_id)
            if call is not None:
                self._log_call(call, grpc.StatusCode.UNAVAILABLE)
        if self._draining and not self._calls:
            self._loop.call_soon(self._close_drained)

    def _upstream_ended(self, stream_id: int) -> None:
        """A response that ended with DATA, without trailers: not a gRPC server's."""
        call = self._calls.pop(stream_id, None)
        if call is not None:
            self._log_call(call, _status_code(None, call.http_status))
        self._call_ended()

    def _request_data(self, stream_id: int, data: bytes, start: int, end: int) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            added, call.need_in, call.prefix_in = _message_bytes(
                call.need_in, call.prefix_in, data, start, end
            )
            call.bytes_in += added

    def _response_data(self, stream_id: int, data: bytes, start: int, end: int) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            added, call.need_out, call.prefix_out = _message_bytes(
                call.need_out, call.prefix_out, data, start, end
            )
            call.bytes_out += added

    def _caller_reset(self, stream_id: int, error_code: int) -> None:
        call = self._calls.pop(stream_id, None)
        if call is not None and self._log:
            self._log_call(call, grpc.StatusCode.CANCELLED)
        self._call_ended()

    def _upstream_reset(self, stream_id: int, error_code: int) -> None:
        call = self._calls.pop(stream_id, None)
        if call is not None and self._log:
            self._log_call(call, _STATUS_BY_RESET.get(error_code, grpc.StatusCode.INTERNAL))
        self._call_ended()

    def _call_ended(self) -> None:
        if self._draining and not self._calls:
            # After this read's bytes are written: close() sends what is buffered first.
            asyncio.get_running_loop().call_soon(self._close_drained)

    def _caller_ping(self, opaque: bytes) -> None:
        if self._caller_busy:
            # Our answers pile up while the caller does not read: a caller that keeps
            # pinging all the same is flooding (the answer to the HTTP/2 "ping flood").
            self._acks_while_busy += 1
            if self._acks_while_busy > _MAX_ACKS_WHILE_BUSY:
                logger.info("caller %s sends PINGs without reading the answers", self._remote)
                self._broken = True
                self._end_calls(grpc.StatusCode.UNAVAILABLE)
                self._caller.abort()
                return
        self._answer_ping(self._own_to_caller, opaque, self._send_own_to_caller)

    def _upstream_ping(self, opaque: bytes) -> None:
        self._answer_ping(self._own_to_upstream, opaque, self._send_own_to_upstream)

    def _answer_ping(self, own: _OwnFrames, opaque: bytes, send: Callable[[], None]) -> None:
        own.frames.append(frame(PING, ACK, 0, opaque))
        if own.timer is None:
            own.timer = self._loop.call_later(self._ack_delay, send)

    def _cancel_ack_timers(self) -> None:
        self._own_to_caller.cancel()
        self._own_to_upstream.cancel()

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

    # Endings.

    def _log_call(self, call: _Call, code: grpc.StatusCode) -> None:
        log_call(
            CallRecord(
                method=call.method,
                started=call.started,
                remote=self._remote,
                peer=self._peer,
                code=code,
                bytes_in=call.bytes_in,
                bytes_out=call.bytes_out,
                route=self._route,
            )
        )

    def _end_calls(self, code: grpc.StatusCode) -> None:
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if call is not None:
                self._log_call(call, code)

    def _stop_relaying(self) -> None:
        """A peer broke HTTP/2 (or the sidecar failed reading it): end both connections."""
        self._broken = True
        self._end_calls(grpc.StatusCode.INTERNAL)
        self._close_both()

    def _close_both(self) -> None:
        self._cancel_ack_timers()
        _close_within(self._caller, _CLOSE_GRACE_SECONDS)
        if self._upstream is not None:
            _close_within(self._upstream, _CLOSE_GRACE_SECONDS)
