"""The sidecar's lifecycle: start every route, serve, drain on a signal.

`Sidecar` has an explicit lifecycle (`start`, `stop(grace)`) and is an async
context manager for embedding; `run` adds the signal handling of the process:
the first SIGTERM or SIGINT stops accepting and lets in-flight calls finish for
up to the drain grace, a second one exits at once; SIGHUP reloads every route's
credentials.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from types import TracebackType

from sidecar.config.model import Config
from sidecar.errors import EXIT_OK, EXIT_RUNTIME
from sidecar.host.descriptors import raise_open_file_limit
from sidecar.runtime.route import Route

logger = logging.getLogger("sidecar.server")  # by name: operators filter on it


class Sidecar:
    """All routes of one configuration, started and stopped together."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.routes = [Route(route) for route in config.routes]  # validates every certificate

    async def start(self) -> None:
        """Start every route; if one cannot start, stop those already started."""
        started: list[Route] = []
        try:
            for route in self.routes:
                await route.start()
                started.append(route)
        except BaseException:
            await asyncio.gather(*(route.stop(None) for route in started))
            raise

    def reload_credentials(self, *, when_changed: bool = False) -> None:
        """Every route reads its certificate, key and CA bundle again (see Route)."""
        for route in self.routes:
            route.reload_credentials(when_changed=when_changed)

    async def check_credentials(self, interval: float) -> None:
        """Every interval, reload the routes whose credential files hold something new (a
        Kubernetes secret's symlink swapped, cert-manager's renewal): content is compared,
        not modification times."""
        while True:
            await asyncio.sleep(interval)
            self.reload_credentials(when_changed=True)

    async def stop(self, grace: float | None) -> None:
        """Stop accepting everywhere; in-flight calls have up to grace seconds to finish."""
        await asyncio.gather(*(route.stop(grace) for route in self.routes))
        logger.info("stopped")

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop(None)


async def run(config: Config) -> int:
    """Serve until SIGTERM/SIGINT, drain, and return the process exit code."""
    sidecar = Sidecar(config)  # validates every certificate first
    raise_open_file_limit()  # each spliced caller costs two descriptors
    await sidecar.start()
    stop_requested = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logger.info(
                "%s: draining, in-flight calls have up to %gs (again to exit now)",
                signum.name,
                config.drain_grace,
            )
            stop_requested.set()
        else:
            logger.warning("%s again: exiting now", signum.name)
            logging.shutdown()
            os._exit(EXIT_RUNTIME)  # the drain is what we would have waited for

    def on_reload() -> None:
        logger.info("SIGHUP: reloading every route's certificate, key and CA bundle")
        sidecar.reload_credentials()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    checking = None
    if config.reload_interval:
        checking = loop.create_task(sidecar.check_credentials(config.reload_interval))
    await stop_requested.wait()
    if checking is not None:
        checking.cancel()
    await sidecar.stop(config.drain_grace)
    return EXIT_OK
