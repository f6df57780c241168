"""Is a route ready to serve: what /readyz (runtime/admin.py) reports.

A route is ready when its listener is up, its own certificate is valid now, and, for
an ingress route, its app answers: a connection to the upstream succeeded within the
last _FRESH_SECONDS. The upstream is tried every _PROBE_SECONDS in the background
(only when an admin listener is configured), so that a probe of /readyz costs a
look at what was last seen, never a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from sidecar.config.addresses import Address

_PROBE_SECONDS = 1.0
_FRESH_SECONDS = 3.0
_CONNECT_SECONDS = 1.0


class UpstreamProbe:
    """Whether the app behind an ingress route accepts connections, tried in the background."""

    def __init__(self, upstream: Address) -> None:
        self._upstream = upstream
        self._answered: float | None = None  # time.monotonic() of the last success
        self._failure = "not tried yet"
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await self._try()
            await asyncio.sleep(_PROBE_SECONDS)

    async def _try(self) -> None:
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

    def problem(self) -> str | None:
        """Why the app is not known to answer now, or None."""
        answered = self._answered
        if answered is not None and time.monotonic() - answered <= _FRESH_SECONDS:
            return None
        return f"upstream {self._upstream} does not answer ({self._failure})"
