"""Relay every gRPC call to the upstream as raw bytes, keeping gRPC's semantics exactly.

Every method is served by one generic handler as a stream-stream call: the wire
does not carry a method's shape (a unary client sends one message then
half-closes; a unary server replies one message then trailers), so a
stream/stream bridge is correct for all four call types and the sidecar never
needs the service's schema. Messages stay bytes: nothing is decoded. What a call
does is decided per call from what its client did, never guessed per method: a
request of exactly one message whose client half-closed goes out as a
unary-stream call, which is the same on the wire (see `_MethodRelay._forward`).

What the relay owns, per call:
- the allowlist check (ingress), before anything reaches the upstream;
- request metadata, filtered by the route's header rules, and the caller's deadline,
  passed on;
- response headers sent as soon as the upstream sends them, before any message:
  otherwise grpc.aio sends its own empty headers with the first message and the
  upstream's are lost;
- trailers, status code, details and `grpc-status-details-bin`, unchanged;
- cancellation both ways, without turning a client's cancel into a half-close as
  far as grpc.aio lets the relay know one from the other (see `_confirm_half_close`);
- the call's record, with the status the client was given, for the route's observer;
- the calls' arrivals, which the drain lets settle (see `Relay.settle`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from grpc import aio

# What grpc.aio raises when core fails a batch, e.g. a status sent on a call that is
# over; grpc.aio's own server catches it the same way (grpcio is pinned).
from grpc._cython.cygrpc import ExecuteBatchError

from sidecar.auth.forwarded import xfcc
from sidecar.auth.headers import IDENTITY_FIELD, HeaderRules, path_problem
from sidecar.auth.identity import IdentityReader, PeerIdentity
from sidecar.auth.policy import REVOKED
from sidecar.dataplane import (
    HEALTH_CHECK,
    HEALTH_WATCH,
    RouteParts,
    Serving,
    health_response,
    log_audit,
    log_denial,
)
from sidecar.grpcplane.upstream import Upstream
from sidecar.host.allocator import release_free_memory
from sidecar.observe.calls import CallRecord
from sidecar.observe.connections import UpstreamFailure

logger = logging.getLogger("sidecar.relay")  # by name: operators filter on it

# Clients may invent any :path; keep the per-method cache bounded.
_MAX_CACHED_METHODS = 1024

# How long a call waits, after the first request message, for the client's end of
# stream before relaying as a stream. A unary client's end arrives with its message,
# but the read completes through core's completion queue: with both cores busy, 2 ms
# missed it for about 1 in 60 first calls through egress -> ingress, and the call
# then took the stream path, where grpc.aio can report INTERNAL (see _forward); 20
# ms missed none in 100. A streaming client that sends one message and waits holds
# it back this long, once per call.
_PEEK_SECONDS = 0.02


# A call that moved this many bytes leaves its buffers in the C heap (grpc core's
# slices, the message copies grpc.aio makes), which glibc keeps rather than give
# back (see allocator): a 64 MiB unary call left +75..98 MiB resident, three +136..146.
# Such a call's end schedules one trim of the heap, _TRIM_DELAY_SECONDS later, when
# core has freed the call too; smaller calls cost one comparison.
_LARGE_CALL_BYTES = 8 * 1024 * 1024
_TRIM_DELAY_SECONDS = 1.0

# A client's RST_STREAM at its deadline reaches the sidecar before the sidecar's own
# copy of the deadline expires, by as long as core took to read the call's headers
# (measured up to 30 ms with both cores busy). A call cancelled that close to its
# deadline is logged as expired: its client almost always saw DEADLINE_EXCEEDED.
_DEADLINE_SLACK_SECONDS = 0.1


_HEALTH_METHODS = (HEALTH_CHECK, HEALTH_WATCH)
_WATCH_OVER = "the sidecar is shutting down: watch again"
_MAX_WATCHES = 16  # health Watch calls open on one connection (as the splice)


class _CallEnded(Exception):
    """The client's call ended (cancelled, or its deadline passed) before its answer."""


async def _confirm_half_close(context: Any) -> None:
    """Return when the end of the client's request stream may be relayed as its half-close;
    raise (CancelledError or _CallEnded) when the call turned out to be over instead.

    grpc.aio ends the server-side request stream the same way for "client
    half-closed" (END_STREAM) and for "the call is over" (RST_STREAM, or the deadline
    passing): core reports both as a successful read of no message, and tells a call
    that is over only by completing its close-on-server operation, which grpc.aio
    turns into cancelling the handler's task. That completion comes separately, in no
    fixed order with the read. Forwarding the end at once would let an app that
    commits on half-close commit a cancelled upload, so before it is forwarded:
    - a deadline that has passed ends the call (the deadline is known here);
    - one more read goes through core and its completion queue: a cancellation core
      had already reported lands before it returns, as CancelledError at this await
      (so this must run in the handler's own task). It caught every one of 820 client
      cancels on an idle machine and of 480 with the load average at 7
      (tests/test_cancellation.py watches the wire), for one completion round trip,
      not a timer on every call.
    What it cannot catch is a cancellation core has not yet reported: with both cores
    saturated by other processes, core reported some deadline cancels 10-90 ms after
    the end of the stream. grpc.aio offers nothing that waits for certainty without a
    timer on every half-close (see README, "The per-call data plane").
    """
    if context.time_remaining() == 0:
        raise _CallEnded
    await context.read()  # after the end, only ever the end again
    if context.time_remaining() == 0:
        raise _CallEnded


def _ended_code(context: Any) -> grpc.StatusCode:
    """What the client of a call that ended before its answer was told."""
    remaining = context.time_remaining()
    if remaining is not None and remaining < _DEADLINE_SLACK_SECONDS:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _MethodRelay:
    """The handler for one method: relays each call of it to the upstream."""

    def __init__(self, method: str, relay: Relay) -> None:
        self.method = method
        self._relay = relay
        self._bind(relay.upstream.channel)

    def _bind(self, channel: aio.Channel) -> None:
        self._channel = channel
        self._stream_call = channel.stream_stream(self.method)  # bytes in, bytes out
        self._single_request_call = channel.unary_stream(self.method)

    def _follow_channel(self) -> None:
        """Call over the upstream's channel as it is now: one renewed (egress: new
        credentials) while this call waited for its first request message takes it, as the
        old one refuses new calls once it is closing. Read just before each upstream call
        is made, with no await in between."""
        channel = self._relay.upstream.channel
        if channel is not self._channel:
            self._bind(channel)

    async def handle(self, requests: Any, context: Any) -> None:
        """Serve one call (a coroutine function: grpc.aio checks for one to run it as async).

        The request stream is read with context.read(), in this task, so that the
        end of it can be confirmed here (see _confirm_half_close); `requests` stays
        unused.
        """
        record = CallRecord(
            method=self.method,
            started=time.monotonic(),
            remote=context.peer(),
            route=self._relay.parts.config.name,
        )
        self._relay.call_arrived()
        try:
            malformed = path_problem(self.method.encode("utf-8", "surrogateescape"))
            if malformed is not None:  # as the splice answers it
                record.code = grpc.StatusCode.INTERNAL
                await context.abort(grpc.StatusCode.INTERNAL, f"malformed request: {malformed}")
            if self._relay.parts.health is not None and self.method in _HEALTH_METHODS:
                await self._answer_health(context, record, self._relay.parts.health)
                return
            identity = await self._authorize(context, record)
            await self._forward(context, record, identity)
        except (asyncio.CancelledError, _CallEnded):
            # The client cancelled or its deadline passed; grpc.aio treats a
            # CancelledError from the handler as exactly that, quietly.
            record.code = _ended_code(context)
            raise asyncio.CancelledError from None
        except aio.AbortError:
            raise  # our own abort(): the status is already on its way to the caller
        except Exception:
            # A bug, not an upstream error (those arrive as AioRpcError). Say so
            # plainly instead of letting grpc send UNKNOWN with our internals.
            logger.exception("internal error relaying %s", self.method)
            record.code = grpc.StatusCode.INTERNAL
            await context.abort(grpc.StatusCode.INTERNAL, "sidecar: internal error, see its log")
        finally:
            self._relay.parts.observer.call_ended(record)
            if record.bytes_in + record.bytes_out >= _LARGE_CALL_BYTES:
                self._relay.large_call_ended()

    async def _answer_health(self, context: Any, record: CallRecord, health: Serving) -> None:
        """Answer a grpc.health.v1 call here, from the route's readiness (grpc_health:
        sidecar), for any caller whose certificate is not revoked: the rules are not
        asked. A Watch writes the status now and at each change, until the client ends it."""
        identity = self._relay.identities.read(context.auth_context())
        if identity is not None:
            record.peer = identity.description
            revoked = self._relay.parts.policy.revoked(identity)
            if revoked is not None:
                log_denial(record.peer, record.remote, self.method, revoked)
                record.code = grpc.StatusCode.PERMISSION_DENIED
                record.rule = REVOKED
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, revoked)
        if self.method == HEALTH_CHECK:
            await self._write_health(context, record, health.serving)
            record.code = grpc.StatusCode.OK
            return
        watching = self._relay.watches
        if watching.get(record.remote, 0) >= _MAX_WATCHES:  # per connection (its address)
            record.code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {_MAX_WATCHES} health Watch calls open on one connection",
            )
        watching[record.remote] = watching.get(record.remote, 0) + 1
        changed = asyncio.Event()

        def heard(serving: bool) -> None:
            changed.set()

        health.watch(heard)
        try:
            sent = None
            while True:
                changed.clear()
                serving = health.serving
                if serving != sent:
                    await self._write_health(context, record, serving)
                    sent = serving
                if health.closed:  # the route is stopping: the drain waits for no Watch
                    record.code = grpc.StatusCode.UNAVAILABLE
                    await context.abort(grpc.StatusCode.UNAVAILABLE, _WATCH_OVER)
                await changed.wait()
        finally:
            health.unwatch(heard)
            watching[record.remote] -= 1
            if not watching[record.remote]:
                del watching[record.remote]

    @staticmethod
    async def _write_health(context: Any, record: CallRecord, serving: bool) -> None:
        message = health_response(serving)
        record.bytes_out += len(message)
        await context.write(message)

    async def _authorize(self, context: Any, record: CallRecord) -> PeerIdentity | None:
        """The caller's identity, if the call is allowed; else the call ends here."""
        parts = self._relay.parts
        if not parts.ingress:
            return None  # egress: local callers are the app itself
        policy = parts.policy
        identity = self._relay.identities.read(context.auth_context())
        if identity is not None:
            record.peer = identity.description
        decision = policy.decide(identity, self.method)
        if decision.audit is not None:
            log_audit(record.peer, decision.audit)
        if not decision.allowed:
            log_denial(record.peer, record.remote, self.method, decision.reason)
            record.code = grpc.StatusCode.PERMISSION_DENIED
            record.rule = decision.rule
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
        return identity

    async def _forward(
        self, context: Any, record: CallRecord, identity: PeerIdentity | None
    ) -> None:
        """Relay the call, in the single-request form when the request is one message.

        grpc.aio writes a stream call's messages in batches of their own, and when the
        upstream ends the call before reading one (an unknown method, an interceptor
        refusing the caller) the failed write replaces the upstream's status with
        INTERNAL "Internal error from Core". A unary-stream call sends headers, the
        message and the half-close in one batch: nothing to race. It is used only once
        the client's half-close is confirmed, so it never half-closes a call the
        client did not: the choice is made per call from what the client did.
        """
        metadata = self._relay.parts.headers.request_metadata(context.invocation_metadata())
        config = self._relay.parts.config
        if identity is not None and config.identity_header:  # the caller's, for the app
            value = xfcc(identity, config.identity_header_fields)
            metadata = (*metadata, (IDENTITY_FIELD.decode(), value))
        # The deadline goes upstream as the time left when the upstream call starts
        # (None when the caller set none).
        first = await context.read()
        if first is aio.EOF:
            await _confirm_half_close(context)
            self._follow_channel()
            call = self._stream_call(iter(()), metadata=metadata, timeout=context.time_remaining())
            await self._relay_whole_request(context, record, call)
            return
        record.bytes_in = len(first)
        second: asyncio.Future[Any] = asyncio.ensure_future(context.read())
        try:
            await asyncio.wait_for(asyncio.shield(second), _PEEK_SECONDS)
        except asyncio.TimeoutError:
            pass  # a streaming client, holding its stream open: relay it as a stream
        except BaseException:
            second.cancel()
            raise
        if second.done() and second.result() is aio.EOF:
            await _confirm_half_close(context)
            self._follow_channel()
            call = self._single_request_call(
                first, metadata=metadata, timeout=context.time_remaining()
            )
            await self._relay_whole_request(context, record, call)
            return
        self._follow_channel()
        call = self._stream_call(metadata=metadata, timeout=context.time_remaining())
        await self._relay_stream(context, record, call, first, second)

    async def _relay_whole_request(self, context: Any, record: CallRecord, call: Any) -> None:
        """Relay the responses of a call whose whole request went upstream with it."""
        try:
            responses = _relay_responses(call, context, record, self._relay.parts.headers)
            await self._finish(context, record, await responses)
        finally:
            if not call.done():
                call.cancel()  # every way out of the handler ends the upstream call

    async def _relay_stream(
        self,
        context: Any,
        record: CallRecord,
        call: Any,
        first: bytes,
        second: asyncio.Future[Any],
    ) -> None:
        """Relay a request stream from this task while a second task relays the responses.

        The requests are pumped here, not by grpc.aio's own task, so that the stream's
        end is confirmed in the handler's task (see _confirm_half_close). When the
        upstream ends the call first, the response task interrupts the pump.
        """
        handler = asyncio.current_task()
        assert handler is not None
        responses = asyncio.ensure_future(
            _relay_responses(call, context, record, self._relay.parts.headers)
        )
        pumping = True

        def upstream_ended(_: object) -> None:
            if pumping:
                handler.cancel()  # the client may never send more: stop waiting for it

        responses.add_done_callback(upstream_ended)
        try:
            try:
                await _pump_requests(context, record, call, first, second)
                pumping = False
            except asyncio.CancelledError:
                pumping = False
                if not responses.done() or responses.cancelled():
                    raise  # the client cancelled, or its deadline passed
                uncancel = getattr(handler, "uncancel", None)  # Python 3.11+
                if uncancel is not None:
                    uncancel()  # our own cancel: the upstream ended the call
            await self._finish(context, record, await responses)
        finally:
            pumping = False
            second.cancel()
            responses.cancel()
            if not call.done():
                call.cancel()  # every way out of the handler ends the upstream call

    async def _finish(
        self, context: Any, record: CallRecord, error: aio.AioRpcError | None
    ) -> None:
        """Give the client the upstream's status (OK: by returning, grpc.aio sends it)."""
        if error is None:
            record.code = grpc.StatusCode.OK
            return
        record.code = error.code()
        try:
            await context.abort(
                error.code(),
                await self._relay.describe_error(error),
                self._relay.parts.headers.response_metadata(error.trailing_metadata()),
            )
        except ExecuteBatchError:
            # The status could not be sent: the call had already ended (the client's
            # deadline passed, which is often why the upstream's did too).
            raise _CallEnded from None


async def _pump_requests(
    context: Any, record: CallRecord, call: Any, first: bytes, second: asyncio.Future[Any]
) -> None:
    """Write the client's messages upstream, then its half-close once confirmed."""
    try:
        await call.write(first)
        message = await second
        while message is not aio.EOF:
            record.bytes_in += len(message)
            await call.write(message)
            message = await context.read()
    except (aio.AioRpcError, asyncio.InvalidStateError):
        return  # the upstream ended the call; the response side has its status
    await _confirm_half_close(context)
    await call.done_writing()


async def _relay_responses(
    call: Any, context: Any, record: CallRecord, rules: HeaderRules
) -> aio.AioRpcError | None:
    """Relay the upstream's headers, messages and trailers; its error if it ends in one.

    Raises _CallEnded when the client's call ended while relaying.
    """
    try:
        headers = await call.initial_metadata()
        if headers:
            await context.send_initial_metadata(rules.response_metadata(headers))
        async for message in call:
            record.bytes_out += len(message)
            await context.write(message)
        trailers = rules.response_metadata(await call.trailing_metadata())
        if trailers:
            context.set_trailing_metadata(trailers)
    except aio.AioRpcError as error:
        return error
    except ExecuteBatchError:
        raise _CallEnded from None  # a write to the client failed: its call is over
    return None


class Relay(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The generic handler serving every method by relaying it to one upstream."""

    def __init__(self, upstream: Upstream, parts: RouteParts) -> None:
        self.upstream = upstream
        self.parts = parts
        self.identities = IdentityReader()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._arrived = asyncio.Event()  # set by each call's arrival (see settle)
        self._trim: asyncio.TimerHandle | None = None
        self.watches: dict[str, int] = {}  # health Watch calls open, by caller address

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            if len(self._handlers) >= _MAX_CACHED_METHODS:
                del self._handlers[next(iter(self._handlers))]
            handler = grpc.stream_stream_rpc_method_handler(_MethodRelay(method, self).handle)
            self._handlers[method] = handler
        return handler

    def renew_channel(self) -> None:
        """New calls go over a new channel to the upstream (Upstream.renew); each method's
        handler takes it for its next call (_MethodRelay._follow_channel)."""
        self.upstream.renew()

    def call_arrived(self) -> None:
        self._arrived.set()

    def large_call_ended(self) -> None:
        """Give the heap's free memory back to the system soon (once for a run of calls)."""
        if self._trim is None:
            loop = asyncio.get_running_loop()
            self._trim = loop.call_later(_TRIM_DELAY_SECONDS, self._release_free_memory)

    def _release_free_memory(self) -> None:
        self._trim = None
        release_free_memory()

    async def settle(self, quiet: float, limit: float) -> None:
        """Return once no call has arrived for `quiet` seconds, or after `limit` seconds.

        grpc core hands the calls it has accepted to the handler one at a time, as
        grpc.aio asks for them, and its shutdown (aio.Server.stop) cancels every call
        not handed over yet: a burst that arrived just before a drain would end
        CANCELLED, unanswered and unlogged. Waiting for the arrivals to pause lets core
        hand over every call it holds before the drain shuts it down.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while (left := end - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(quiet, left))
            except asyncio.TimeoutError:
                return

    async def describe_error(self, error: aio.AioRpcError) -> str:
        """The details the caller sees: the upstream's own, or, for a failure to reach
        the upstream, a message naming the upstream and why it cannot be reached."""
        details: str = error.details() or ""
        if error.code() == grpc.StatusCode.UNAVAILABLE and not self.upstream.connected():
            self.parts.connections.upstream_failed(_failure_kind(details))
            return await self.upstream.describe_failure(details)
        return details


def _failure_kind(details: str) -> UpstreamFailure:
    """What kind of failure to reach the upstream grpc core's details describe (its words,
    not an error type: best effort, for the metrics' label)."""
    lowered = details.lower()
    if "connection refused" in lowered:
        return "refused"
    if "timeout" in lowered or "deadline" in lowered or "timed out" in lowered:
        return "timeout"
    if "ssl" in lowered or "handshake" in lowered or "certificate" in lowered:
        return "tls"
    if "failed to connect" in lowered or "unreachable" in lowered or "dns" in lowered:
        return "unreachable"
    return "other"
