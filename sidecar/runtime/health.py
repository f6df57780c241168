"""Is a route ready to serve: what /readyz (runtime/admin.py) reports, and what
`grpc_health: sidecar` answers health calls with.

A route is ready when its listener is up, its own certificate is valid now, and, for
an ingress route, its app answers: a check of the upstream succeeded within the last
_FRESH_SECONDS. The check (`upstream_health_check`) is a TCP connection (tcp), or a
grpc.health.v1 Check of the whole server (service "") answered SERVING (grpc). It runs
every _PROBE_SECONDS in the background (when readiness is served or answers health
calls), so that a probe of /readyz costs a look at what was last seen, never a
connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio

from sidecar.config.addresses import Address
from sidecar.config.model import UpstreamHealthCheck

_PROBE_SECONDS = 1.0
_FRESH_SECONDS = 3.0
_CONNECT_SECONDS = 1.0


class UpstreamProbe:
    """Whether the app behind an ingress route answers, checked in the background."""

    def __init__(
        self,
        upstream: Address,
        check: UpstreamHealthCheck = "tcp",
        *,
        tried: Callable[[], None] | None = None,
    ) -> None:
        self._upstream = upstream
        self._check = check
        self._tried = tried  # called after each check
        self._answered: float | None = None  # time.monotonic() of the last success
        self._failure = "not tried yet"
        self._task: asyncio.Task[None] | None = None
        self._channel: aio.Channel | None = None  # grpc: kept, it reconnects by itself
        self._health_check: Any = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._channel is not None:
            # The task is cancelled: nothing uses the channel any more.
            asyncio.get_running_loop().create_task(self._channel.close())
            self._channel = None

    async def _run(self) -> None:
        while True:
            if self._check == "grpc":
                await self._try_grpc()
            else:
                await self._try_tcp()
            if self._tried is not None:
                self._tried()
            await asyncio.sleep(_PROBE_SECONDS)

    async def _try_tcp(self) -> None:
        upstream = self._upstream
        try:
            if upstream.unix_path is not None:
                opening = asyncio.open_unix_connection(upstream.unix_path)
            else:
                opening = asyncio.open_connection(upstream.host, upstream.port)
            _, writer = await asyncio.wait_for(opening, _CONNECT_SECONDS)
        except asyncio.TimeoutError:
            self._failure = f"no answer within {_CONNECT_SECONDS:g}s"
            return
        except OSError as error:
            self._failure = error.strerror or str(error)
            return
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        self._answered = time.monotonic()

    async def _try_grpc(self) -> None:
        # grpcio-health-checking's messages (protobuf), imported only for this check.
        from grpc_health.v1 import health_pb2

        if self._channel is None:
            self._channel = aio.insecure_channel(self._upstream.target)
            self._health_check = self._channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
        try:
            reply = await self._health_check(
                health_pb2.HealthCheckRequest(service=""), timeout=_CONNECT_SECONDS
            )
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                self._failure = f"no health answer within {_CONNECT_SECONDS:g}s"
            elif code is grpc.StatusCode.UNIMPLEMENTED:
                self._failure = (
                    "its health Check is UNIMPLEMENTED (the app has no grpc.health.v1 "
                    "service: use upstream_health_check: tcp)"
                )
            else:
                self._failure = f"health Check failed: {code.name}: {details}"
            return
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            self._failure = f"its health Check answered {status}"
            return
        self._answered = time.monotonic()

    def problem(self) -> str | None:
        """Why the app is not known to answer now, or None."""
        answered = self._answered
        if answered is not None and time.monotonic() - answered <= _FRESH_SECONDS:
            return None
        return f"upstream {self._upstream} does not answer ({self._failure})"
