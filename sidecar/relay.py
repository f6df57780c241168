"""Relay every gRPC call to the upstream as raw bytes, keeping gRPC's semantics exactly.

Every method is served by one generic handler as a stream-stream call: the wire
does not carry a method's shape (a unary client sends one message then
half-closes; a unary server replies one message then trailers), so a
stream/stream bridge is correct for all four call types and the sidecar never
needs the service's schema. Messages stay bytes: nothing is decoded. Upstream, a
request of exactly one message goes out as a unary-stream call, which is the same
on the wire (see `_MethodRelay._start_upstream_call` for why).

What the relay owns, per call:
- the allowlist check (when a policy is set), before anything reaches the upstream;
- request metadata, filtered (see `metadata`), and the caller's deadline, passed on;
- response headers sent as soon as the upstream sends them, before any message:
  otherwise grpc.aio sends its own empty headers with the first message and the
  upstream's are lost;
- trailers, status code, details and `grpc-status-details-bin`, unchanged;
- cancellation both ways, without turning a cancel into a half-close (see `_requests`);
- one access-log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from sidecar.accesslog import CallRecord, log_call
from sidecar.identity import IdentityReader
from sidecar.loglimit import LogLimiter
from sidecar.metadata import request_metadata, response_metadata
from sidecar.policy import Policy
from sidecar.upstream import Upstream

logger = logging.getLogger(__name__)
# A line per denied call would let a denied caller write the log at its call rate.
_denials = LogLimiter(logger)

# Clients may invent any :path; keep the per-method cache bounded.
_MAX_CACHED_METHODS = 1024

# How long a request stream's end waits for a cancellation that may be on its way
# (see _let_pending_cancellation_land). Measured through the TLS listener on
# uvloop: 1 ms let END_STREAM leak before RST_STREAM about once in 50 cancels;
# 2 ms leaked none in 900, also with both cores busy. 5 ms leaves margin, and only
# request-streaming calls pay it, once, at their half-close.
_CANCELLATION_GRACE_SECONDS = 0.005

# How long a call of a method not yet seen streaming waits, after the first request
# message, for the client's end of stream before relaying as a stream (see
# _start_upstream_call). A unary client's end arrives with its message, but the
# read completes through core's completion queue: with both cores busy, 2 ms
# missed it for about 1 in 60 first calls through egress -> ingress, and the
# refused call then read INTERNAL; 20 ms missed none in 100. A streaming client
# that sends one message and waits holds it back this long, once per call.
_PEEK_SECONDS = 0.02


async def _let_pending_cancellation_land() -> None:
    """Give a client's cancellation that is on its way the time to reach the handler.

    grpc.aio ends the server-side request iterator the same way for "client
    half-closed" and "client cancelled". Forwarding that end at once would send the
    upstream END_STREAM and only then RST_STREAM, and an upstream that commits on
    half-close (an upload, a client-streaming transaction) would commit a truncated
    stream. If a cancellation is pending, it lands during this pause: the handler
    is cancelled, cancels the upstream call and with it this pump, and the upstream
    sees RST_STREAM alone. A heuristic, bounded by grpc.aio's API, which does not
    expose the difference; tests/test_cancellation.py watches the wire.
    """
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    await asyncio.sleep(_CANCELLATION_GRACE_SECONDS)


class _MethodRelay:
    """The handler for one method: relays each call of it to the upstream."""

    def __init__(self, method: str, relay: Relay) -> None:
        self.method = method
        self._relay = relay
        channel = relay.upstream.channel
        self._stream_call = channel.stream_stream(method)  # bytes in, bytes out
        self._single_request_call = channel.unary_stream(method)
        # Learned: has a call of this method ever carried other than one request
        # message? Such methods go straight to the stream path and pay for the
        # cancellation guard; single-request calls keep their latency.
        self._request_streaming = False

    async def _requests(
        self, requests: AsyncIterator[bytes], record: CallRecord
    ) -> AsyncIterator[bytes]:
        """Pump the caller's messages to the upstream, counting them."""
        async for message in requests:
            record.messages_in += 1
            record.bytes_in += len(message)
            yield message
        if record.messages_in != 1:
            self._request_streaming = True
        if self._request_streaming:
            await _let_pending_cancellation_land()

    async def _start_upstream_call(
        self, requests: AsyncIterator[bytes], context: Any, record: CallRecord
    ) -> Any:
        """Start the upstream call, in the single-request form when the request is one message.

        grpc.aio writes a stream call's messages in batches of their own, and when the
        upstream ends the call before reading one (an unknown method, an interceptor
        refusing the caller) the failed write replaces the upstream's status with
        INTERNAL "Internal error from Core". A unary-stream call sends headers, the
        message and the half-close in one batch: nothing to race. A unary client's
        end-of-stream arrives with its message, so peeking for it costs one loop turn;
        a streaming client is never held longer than _PEEK_SECONDS.
        """
        metadata = request_metadata(context.invocation_metadata())
        timeout = context.time_remaining()  # None when the caller set no deadline
        if not self._request_streaming:
            peeked = await _peek_single_request(requests)
            if isinstance(peeked, bytes):
                record.messages_in = 1
                record.bytes_in = len(peeked)
                return self._single_request_call(peeked, metadata=metadata, timeout=timeout)
            requests = peeked
        return self._stream_call(
            self._requests(requests, record), metadata=metadata, timeout=timeout
        )

    async def handle(self, requests: AsyncIterator[bytes], context: Any) -> None:
        """Serve one call (a coroutine function: grpc.aio checks for one to run it as async)."""
        record = CallRecord(
            method=self.method,
            started=time.monotonic(),
            remote=context.peer(),
            route=self._relay.route,
        )
        try:
            await self._authorize(context, record)
            await self._forward(requests, context, record)
        except asyncio.CancelledError:
            record.code = grpc.StatusCode.CANCELLED  # the caller cancelled or its deadline passed
            raise
        except aio.AbortError:
            raise  # our own abort(): the status is already on its way to the caller
        except Exception:
            # A bug, not an upstream error (those arrive as AioRpcError). Say so
            # plainly instead of letting grpc send UNKNOWN with our internals.
            logger.exception("internal error relaying %s", self.method)
            record.code = grpc.StatusCode.INTERNAL
            await context.abort(grpc.StatusCode.INTERNAL, "sidecar: internal error, see its log")
        finally:
            log_call(record)

    async def _authorize(self, context: Any, record: CallRecord) -> None:
        policy = self._relay.policy
        if policy is None:
            return
        identity = self._relay.identities.read(context.auth_context())
        if identity is not None:
            record.peer = identity.description
        decision = policy.decide(identity, self.method)
        if not decision.allowed:
            _denials.log(logging.WARNING, record.peer, "denied: %s", decision.reason)
            record.code = grpc.StatusCode.PERMISSION_DENIED
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason)

    async def _forward(
        self, requests: AsyncIterator[bytes], context: Any, record: CallRecord
    ) -> None:
        call = await self._start_upstream_call(requests, context, record)
        try:
            headers = await call.initial_metadata()
            if headers:
                await context.send_initial_metadata(response_metadata(headers))
            async for message in call:
                record.bytes_out += len(message)
                await context.write(message)
            trailers = response_metadata(await call.trailing_metadata())
            if trailers:
                context.set_trailing_metadata(trailers)
            record.code = grpc.StatusCode.OK
        except aio.AioRpcError as error:
            record.code = error.code()
            await context.abort(
                error.code(),
                await self._relay.describe_error(error),
                response_metadata(error.trailing_metadata()),
            )
        finally:
            if not call.done():
                call.cancel()  # every way out of the handler ends the upstream call


async def _next_or_end(requests: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await anext(requests)
    except StopAsyncIteration:
        return None


async def _replay(
    first: bytes, pending: asyncio.Task[bytes | None], rest: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    yield first
    second = await pending
    if second is None:
        return
    yield second
    async for message in rest:
        yield message


async def _empty() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _peek_single_request(requests: AsyncIterator[bytes]) -> bytes | AsyncIterator[bytes]:
    """The request if it is exactly one message; otherwise an iterator over all of them.

    Never waits more than _PEEK_SECONDS for the end of the stream after the first
    message; a read that is still pending then is handed on, not cancelled.
    """
    requests = aiter(requests)
    first = await _next_or_end(requests)
    if first is None:
        return _empty()
    pending = asyncio.ensure_future(_next_or_end(requests))
    try:
        await asyncio.wait_for(asyncio.shield(pending), _PEEK_SECONDS)
    except asyncio.TimeoutError:
        return _replay(first, pending, requests)
    except BaseException:
        pending.cancel()
        raise
    if pending.result() is None:
        return first
    return _replay(first, pending, requests)


class Relay(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The generic handler serving every method by relaying it to one upstream."""

    def __init__(self, upstream: Upstream, policy: Policy | None, route: str | None = None) -> None:
        self.upstream = upstream
        self.policy = policy  # None: no allowlist (an egress route's local callers)
        self.route = route  # the route's name, for the access log
        self.identities = IdentityReader()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            if len(self._handlers) >= _MAX_CACHED_METHODS:
                del self._handlers[next(iter(self._handlers))]
            handler = grpc.stream_stream_rpc_method_handler(_MethodRelay(method, self).handle)
            self._handlers[method] = handler
        return handler

    async def describe_error(self, error: aio.AioRpcError) -> str:
        """The details the caller sees: the upstream's own, or, for a failure to reach
        the upstream, a message naming the upstream and why it cannot be reached."""
        details: str = error.details() or ""
        if error.code() == grpc.StatusCode.UNAVAILABLE and not self.upstream.connected():
            return await self.upstream.describe_failure(details)
        return details
