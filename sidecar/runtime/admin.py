"""The admin listener (`admin`): plain HTTP for operators and orchestrators.

    GET /healthz   200 while the process serves (liveness)
    GET /readyz    200 when every route is ready (runtime/health.py), else 503 and a JSON
                   body naming what is not
    GET /metrics   Prometheus text format (OpenMetrics when the Accept header asks for it)
    GET /status    JSON: version, uptime, each route (no key material)

It is loopback-only unless unsafe_admin (it has no authentication). Anything may
connect to it, so each request is bounded like a caller's: its head must arrive
within _REQUEST_SECONDS and fit in _HEAD_BYTES, at most _CONNECTIONS are served at
once, one request per connection, GET and HEAD only. Beyond _CONNECTIONS, the oldest
connection still waiting for its request head is closed for the new one (so idle
connections cannot keep an orchestrator's probe out), or, when none waits, the new
one is closed unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics_exposition

from sidecar import __version__
from sidecar.config.addresses import Address
from sidecar.errors import StartupError
from sidecar.observe.metrics import Metrics

logger = logging.getLogger("sidecar.server")

_REQUEST_SECONDS = 5.0
_HEAD_BYTES = 8192
_CONNECTIONS = 64

# What the routes report of themselves (runtime/route.py): readiness problems, and status.
ReadinessProbe = Callable[[], list[str]]
StatusProbe = Callable[[], dict[str, object]]


class Answers(Protocol):
    """What the admin listener serves: one process's own, or its workers' added up
    (runtime/workers.py)."""

    async def not_ready(self) -> list[str]: ...

    async def metrics(self, openmetrics: bool) -> tuple[str, bytes]:
        """The content type and the exposition."""
        ...

    async def status(self) -> dict[str, object]: ...


class ProcessAnswers:
    """One process's own answers."""

    def __init__(self, metrics: Metrics, not_ready: ReadinessProbe, status: StatusProbe) -> None:
        self._metrics = metrics
        self._not_ready = not_ready
        self._status = status

    async def not_ready(self) -> list[str]:
        return self._not_ready()

    async def metrics(self, openmetrics: bool) -> tuple[str, bytes]:
        return exposition(self._metrics.registry, openmetrics)

    async def status(self) -> dict[str, object]:
        return self._status()


def exposition(registry: CollectorRegistry, openmetrics: bool) -> tuple[str, bytes]:
    """The registry's metrics in the format asked for, and its content type."""
    if openmetrics:
        text = openmetrics_exposition.generate_latest(registry)  # type: ignore[no-untyped-call]
        return openmetrics_exposition.CONTENT_TYPE_LATEST, text
    return CONTENT_TYPE_LATEST, generate_latest(registry)


class Admin:
    """The admin listener of one process."""

    def __init__(self, address: Address, answers: Answers) -> None:
        self._address = address
        self._answers = answers
        self._server: asyncio.Server | None = None
        self._serving = 0
        # Connections whose request head has not come yet, oldest first (see the module doc).
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self._started = time.monotonic()
        self.port: int | None = None

    async def start(self) -> None:
        address = self._address
        try:
            if address.unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.stat(address.unix_path).st_mode):
                        os.unlink(address.unix_path)  # a previous run's: bind would fail on it
                self._server = await asyncio.start_unix_server(
                    self._serve, address.unix_path, limit=_HEAD_BYTES
                )
            else:
                self._server = await asyncio.start_server(
                    self._serve, address.host, address.port, limit=_HEAD_BYTES
                )
        except OSError as error:
            raise StartupError(f"admin: cannot listen on {address}: {error.strerror}") from None
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if address.unix_path is None else None
        where = address.target if address.unix_path else f"{address.host}:{self.port}"
        # Not "listening on": that says where callers connect (and scripts look for it).
        logger.info("admin: /metrics /healthz /readyz /status served at %s", where)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            if self._address.unix_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._address.unix_path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._serving >= _CONNECTIONS:
            if not self._waiting:
                writer.close()
                return
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.close()  # its read ends; its place is this connection's
        self._serving += 1
        self._waiting[writer] = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_SECONDS)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                head = b""
            self._waiting.pop(writer, None)
            if writer.is_closing():
                return  # closed for a newer connection (see the module doc)
            status, content_type, body = await self._answered(head)
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if head.startswith(b"HEAD ") else body)
            )
            await asyncio.wait_for(writer.drain(), _REQUEST_SECONDS)
        except (ConnectionError, asyncio.TimeoutError):
            pass  # the client went away, or does not read: nothing to tell it
        finally:
            self._waiting.pop(writer, None)
            self._serving -= 1
            writer.close()

    async def _answered(self, head: bytes) -> tuple[int, str, bytes]:
        if not head:
            return 400, "text/plain", b"bad request\n"
        try:
            return await self._answer(head)
        except Exception:  # a bug: the caller of the admin listener learns that much
            logger.exception("admin: internal error answering %r", head.split(b"\r\n", 1)[0])
            return 500, "text/plain", b"internal error: see the sidecar's log\n"

    async def _answer(self, head: bytes) -> tuple[int, str, bytes]:
        request_line, _, rest = head.partition(b"\r\n")
        parts = request_line.split(b" ")
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"GET or HEAD only\n"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/healthz":
            return 200, "text/plain", b"ok\n"
        if path == b"/readyz":
            problems = await self._answers.not_ready()
            body = json.dumps({"ready": not problems, "not_ready": problems}, indent=1)
            return (503 if problems else 200), "application/json", body.encode() + b"\n"
        if path == b"/metrics":
            openmetrics = b"application/openmetrics-text" in rest.lower()
            content_type, text = await self._answers.metrics(openmetrics)
            return 200, content_type, text
        if path == b"/status":
            status = {
                "version": __version__,
                "uptime_seconds": round(time.monotonic() - self._started, 3),
                **(await self._answers.status()),
            }
            return 200, "application/json", json.dumps(status, indent=1).encode() + b"\n"
        return 404, "text/plain", b"not found: /metrics /healthz /readyz /status\n"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
