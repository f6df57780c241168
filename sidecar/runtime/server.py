"""The sidecar's lifecycle: start every route, serve, drain on a signal.

`Sidecar` has an explicit lifecycle (`start`, `stop(grace)`) and is an async
context manager for embedding; `run` adds the signal handling of the process:
the first SIGTERM or SIGINT stops accepting and lets in-flight calls finish for
up to the drain grace, a second one exits at once; SIGHUP reloads every route's
credentials, and the configuration file if there is one (runtime/reload.py).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from sidecar.config.model import Config, RouteConfig
from sidecar.config.pem import read_bytes
from sidecar.errors import EXIT_OK, EXIT_RUNTIME, ConfigError
from sidecar.host.descriptors import raise_open_file_limit
from sidecar.observe import logs
from sidecar.observe.accesslog import access_logger
from sidecar.observe.metrics import Expiries, Metrics
from sidecar.runtime.admin import Admin, ProcessAnswers
from sidecar.runtime.reload import PROCESS_FIELDS_IN_PLACE, needs_restart, route_key
from sidecar.runtime.route import Route
from sidecar.runtime.worker import EXIT_NOW, WorkerSetup

logger = logging.getLogger("sidecar.server")  # by name: operators filter on it


class _Said(logging.Handler):
    """Counts what a reload said: it failed when it said an ERROR (each route and the config
    file report their own faults, and keep what runs)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines = self.errors = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        self.errors += record.levelno >= logging.ERROR


def _utc_now() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%S.%fZ}"


def _labels(routes: tuple[RouteConfig, ...]) -> list[str]:
    """How metrics name each route: its name, or its mode (and place, if two would clash)."""
    plain = [route.name or route.mode for route in routes]
    return [
        label if plain.count(label) == 1 else f"{label}[{index}]"
        for index, label in enumerate(plain)
    ]


class Sidecar:
    """All routes of one configuration, started and stopped together.

    reread, when the configuration comes from a file, reads it again (with the same
    flags and environment) for a reload: see runtime/reload.py for what changes in
    place and what takes a restart.
    """

    def __init__(
        self,
        config: Config,
        reread: Callable[[], Config] | None = None,
        config_file: str | None = None,
        listening: Sequence[list[socket.socket]] | None = None,
    ) -> None:
        """listening: a worker's listening sockets, per route (bound by its supervisor)."""
        self.config = config
        self._access_log_at_start = access_logger.isEnabledFor(logging.INFO)
        # Metrics are kept when an admin listener serves them.
        self.metrics = None
        if config.admin is not None:
            self.metrics = Metrics(config.metrics_methods, config.metrics_callers or 0)
        metrics = self.metrics
        inherited: Sequence[list[socket.socket] | None] = listening or [None] * len(config.routes)
        self.routes = [  # each validates its certificates
            Route(route, metrics, label, socks)
            for route, label, socks in zip(
                config.routes, _labels(config.routes), inherited, strict=True
            )
        ]
        self._admin: Admin | None = None
        if config.admin is not None and metrics is not None:
            self._admin = Admin(config.admin, ProcessAnswers(metrics, self.not_ready, self.status))
            metrics.watch(Expiries(self._expiries))
        self.last_reload: dict[str, str] | None = None
        self._reread = reread
        # The config file's bytes when last read: a periodic check parses it only when they
        # change (parsing a large file on the event loop at every check would stall calls).
        self._config_file = Path(config_file) if config_file else None
        self._config_bytes = self._read_config_bytes()
        # The configuration last read by a reload, or why it could not be read: a periodic
        # check acts on (and reports) a configuration once, not at every check.
        self._last_read: Config | str = config
        self._accepted: Config | None = None  # the last configuration read and accepted
        self._checking: asyncio.Task[None] | None = None

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
        if self._admin is not None:
            await self._admin.start()
        self._check_every(self.config.reload_interval)

    def not_ready(self) -> list[str]:
        """Why the sidecar is not ready to serve (every route's reasons), or nothing."""
        return [problem for route in self.routes for problem in route.not_ready()]

    def status(self) -> dict[str, object]:
        """What /status says of the process's routes and its last reload."""
        return {
            "routes": [route.status() for route in self.routes],
            "last_reload": self.last_reload,
        }

    def _expiries(self) -> list[tuple[str, str, float]]:
        labels = _labels(self.config.routes)
        return [
            (label, which, not_after)
            for label, route in zip(labels, self.routes, strict=True)
            for which, not_after in route.expiries()
        ]

    def _reload(self, *, when_changed: bool) -> None:
        config = self._read_config(when_changed)
        if config is not None:
            self._apply(config)
        for index, route in enumerate(self.routes):
            update = None
            if config is not None:
                update = config.routes[index]
            try:
                route.reload(update, when_changed=when_changed, grace=self.config.drain_grace)
            except Exception:  # a bug in one route's reload must not hold the others back
                logger.exception(
                    "%s: reload failed (a bug: please report it); what runs stays",
                    route.config.title,
                )
        # What runs now (a route whose new credential files were refused keeps its old ones).
        self.config = replace(self.config, routes=tuple(route.config for route in self.routes))

    def _read_config(self, when_changed: bool) -> Config | None:
        """The configuration to apply: the file read again if it can be applied in place (a
        file that cannot is refused with one ERROR); else the last one that could be, or
        None. The last one accepted stays the aim: a route whose new credential files were
        refused (not written yet, say) takes them once they pass."""
        if self._reread is None:
            return None
        if when_changed:
            raw = self._read_config_bytes()
            if raw == self._config_bytes:
                return self._accepted
            self._config_bytes = raw
        try:
            config: Config | str = self._reread()
        except ConfigError as error:
            config = str(error)
        if when_changed and config == self._last_read:
            return self._accepted
        self._last_read = config
        if isinstance(config, str):
            logger.error("config not reloaded, the running configuration stays: %s", config)
            return self._accepted
        refusal = needs_restart(self.config, config)
        if refusal is not None:
            logger.error("config not reloaded, the running configuration stays: %s", refusal)
            return self._accepted
        # In the running order (routes are matched by name, or place), for Route.reload.
        by_key = {route_key(route, i): route for i, route in enumerate(config.routes)}
        routes = tuple(by_key[route_key(r.config, i)] for i, r in enumerate(self.routes))
        self._accepted = replace(config, routes=routes)
        return self._accepted

    def _read_config_bytes(self) -> bytes | str | None:
        """The config file's bytes, or why they cannot be read (None: there is no file)."""
        if self._config_file is None:
            return None
        try:
            return read_bytes(self._config_file, "--config")
        except ConfigError as error:
            return str(error)

    def _apply(self, config: Config) -> None:
        """Take the process settings that change in place."""
        running, self.config = self.config, replace(config, routes=self.config.routes)
        if config.log_level != running.log_level:
            logs.set_level(config.log_level)  # first: the line saying so is at the new level
        for key in sorted(PROCESS_FIELDS_IN_PLACE):
            before, after = getattr(running, key), getattr(config, key)
            if before != after:
                logger.info("config reloaded: %s %s, was %s", key, after, before)
        access_log_on = access_logger.isEnabledFor(logging.INFO)
        if (
            config.log_level != running.log_level
            and access_log_on
            and not self._access_log_at_start
        ):
            logger.warning(
                "log_level %s: the access log stays off until a restart (each route chooses "
                "its call observer when it starts, and log_level was above info then)",
                config.log_level,
            )
        if config.reload_interval != running.reload_interval:
            self._check_every(config.reload_interval)

    def _check_every(self, interval: float) -> None:
        """Check the files every interval (0: never), replacing the check running."""
        if self._checking is not None:
            self._checking.cancel()
            self._checking = None
        if interval:
            self._checking = asyncio.get_running_loop().create_task(self._check(interval))

    async def _check(self, interval: float) -> None:
        """Every interval, reload what changed: the config file, or a route's credential
        files (a Kubernetes secret's symlink swapped, cert-manager's renewal). Content is
        compared, not modification times."""
        while True:
            await asyncio.sleep(interval)
            self.reload(when_changed=True)

    def reload(self, *, when_changed: bool = False) -> None:
        """Read the configuration file again (if there is one) and apply what can change in
        place, then every route's certificate, key and CA bundle. when_changed (a periodic
        check): act, and speak, only on what was not read before. A bug must not end the
        periodic checks or reach the signal handler: it is logged, and what runs stays."""
        said = _Said()
        logger.addHandler(said)
        try:
            self._reload(when_changed=when_changed)
        except Exception:
            logger.exception("reload failed (a bug: please report it); what runs stays")
        finally:
            logger.removeHandler(said)
        if said.lines or not when_changed:  # a periodic check that found nothing is no reload
            outcome = "failed" if said.errors else "ok"
            self.last_reload = {"time": _utc_now(), "outcome": outcome}
            if self.metrics is not None:
                self.metrics.reloads.labels(outcome).inc()

    async def stop(self, grace: float | None) -> None:
        """Stop accepting everywhere; in-flight calls have up to grace seconds to finish."""
        self._check_every(0)
        if self._admin is not None:
            await self._admin.stop()
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


async def run(
    config: Config,
    reread: Callable[[], Config] | None = None,
    config_file: str | None = None,
    worker: WorkerSetup | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, drain, and return the process exit code. reread: how
    SIGHUP reads the configuration again, from config_file (None: it reloads credential
    files only). worker: what a worker inherited from its supervisor (runtime/workers.py)."""
    loop = asyncio.get_running_loop()
    # A SIGHUP while the routes are set up (a SPIFFE route may wait for its agent) would
    # end the process, its default action: there is nothing to reload yet.
    loop.add_signal_handler(signal.SIGHUP, logger.info, "SIGHUP during start-up: ignored")
    listening = worker.sockets() if worker is not None else None
    # Validates every certificate first.
    sidecar = Sidecar(config, reread, config_file, listening)
    raise_open_file_limit()  # each spliced caller costs two descriptors
    await sidecar.start()
    stop_requested = asyncio.Event()
    signals_seen = 0

    def exit_now() -> None:
        for route in sidecar.routes:
            route.flush_calls(closing=True)
        logging.shutdown()
        os._exit(EXIT_RUNTIME)  # the drain is what we would have waited for

    def on_signal(signum: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logger.info(
                "%s: draining, in-flight calls have up to %gs (%s)",
                signum.name,
                sidecar.config.drain_grace,
                "again to exit now" if worker is None else "the supervisor says when to exit now",
            )
            stop_requested.set()
        elif worker is None:
            logger.warning("%s again: exiting now", signum.name)
            exit_now()
        # A worker's drain signal may come twice, from its supervisor and from whoever
        # signalled the whole group (systemd's default): exit now is SIGUSR2, the
        # supervisor's own.

    def on_exit_now() -> None:
        logger.warning("worker %d: told to exit now", worker.index if worker else 0)
        exit_now()

    def on_reload() -> None:
        logger.info(
            "SIGHUP: reloading %severy route's certificate, key and CA bundle",
            "the config file and " if reread is not None else "",
        )
        sidecar.reload()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    if worker is not None:
        loop.add_signal_handler(EXIT_NOW, on_exit_now)
        worker.watch_lifeline(stop_requested)
        worker.say_ready()  # (its signals handled: the supervisor now sends them)
    await stop_requested.wait()
    await sidecar.stop(sidecar.config.drain_grace)
    return EXIT_OK
