"""Workers: `workers: N` processes serving every route, started and watched by a supervisor.

The process the user starts becomes the supervisor. It binds each route's listener
(so a port in use fails the start with exit 1, as one process does), then starts N
workers, each `python -m sidecar` with the same arguments and environment plus what
it inherits, named in _SIDECAR_WORKER: the listening sockets, a pipe it says it is
ready on, and a lifeline (a pipe the supervisor never writes: its end tells a worker
its supervisor is gone, and the worker drains and exits). Every worker accepts on the
same sockets; the kernel hands each connection to a worker waiting in accept(), so a
worker busy with work takes fewer. Worker 0 starts first, the others once it is
ready: a configuration that fails says so once, and the supervisor exits with the
worker's code.

What one process does, N do: SIGTERM or SIGINT drains every worker (a second exits
at once), SIGHUP reloads every worker. A worker that dies is logged and started
again (at once, or after a delay that doubles while it keeps dying young). Each
worker's stderr is a pipe to the supervisor, which writes whole lines only, so lines
never interleave; access lines say `worker=N`. The admin listener is the
supervisor's: /metrics adds up the workers' (asked over a private unix socket each),
/readyz is ready when every worker is, /status lists the workers.

The grpc plane serves from one process: configuration refuses workers > 1 with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config.addresses import parse_address
from sidecar.config.model import Config
from sidecar.errors import EXIT_OK, EXIT_RUNTIME
from sidecar.observe import logs
from sidecar.runtime.admin import Admin, exposition
from sidecar.splice.listener import bind_listener

logger = logging.getLogger("sidecar.server")

# Not SIDECAR_...: the settings are read from those, and this is no setting.
WORKER_ENV = "_SIDECAR_WORKER"

_LIVED_LONG_SECONDS = 10.0  # a worker that dies younger is started again after a delay
_LONGEST_DELAY_SECONDS = 30.0
_ASK_SECONDS = 2.0  # a worker's admin answer; one that takes longer is counted as not ready
_LONGEST_LINE = 65536  # a worker's stderr line longer than this is cut
# Metrics that are one value per process, the same in every worker: taken once (the
# earliest), not added up.
_TAKEN_ONCE = {"sidecar_start_time_seconds", "sidecar_certificate_expiry_timestamp_seconds"}


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """What a worker inherits from its supervisor (passed in WORKER_ENV)."""

    index: int
    listening: tuple[tuple[int, ...], ...]  # each route's listening sockets' descriptors
    admin: str | None  # the unix socket its admin listener serves the supervisor on
    ready: int  # a pipe: one byte written when every route serves
    lifeline: int  # a pipe that ends when the supervisor does

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WorkerSetup | None:
        raw = environ.get(WORKER_ENV)
        if raw is None:
            return None
        fields = json.loads(raw)
        return cls(
            index=int(fields["index"]),
            listening=tuple(tuple(int(fd) for fd in fds) for fds in fields["listening"]),
            admin=fields["admin"],
            ready=int(fields["ready"]),
            lifeline=int(fields["lifeline"]),
        )

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def applied(self, config: Config) -> Config:
        """The configuration as this worker runs it: its admin listener is private."""
        admin = (
            None
            if self.admin is None
            else parse_address(f"unix:{self.admin}", WORKER_ENV, allow_unix=True)
        )
        return dataclasses.replace(config, admin=admin)

    def sockets(self) -> list[list[socket.socket]]:
        return [[socket.socket(fileno=fd) for fd in fds] for fds in self.listening]

    def say_ready(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.ready, b"1")
        with contextlib.suppress(OSError):
            os.close(self.ready)

    def watch_lifeline(self, gone: asyncio.Event) -> None:
        """Set `gone` when the supervisor has ended (its end of the lifeline closed)."""
        loop = asyncio.get_running_loop()

        def ended() -> None:
            loop.remove_reader(self.lifeline)
            logger.warning("worker %d: the supervisor is gone: draining", self.index)
            gone.set()

        loop.add_reader(self.lifeline, ended)


class _Worker:
    """One worker's place: the process in it now, and how it has fared."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.restarts = 0
        self.started = 0.0
        self.delay = 0.0  # before the next start, after a death
        self.relay: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


class Supervisor:
    """Starts the workers, relays their lines, restarts the dead, drains on a signal."""

    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self._argv = list(argv)
        self._workers = [_Worker(index) for index in range(config.workers)]
        self._listening: list[list[socket.socket]] = []
        self._directory = ""
        self._lifeline = (-1, -1)
        self._stopping = False
        self._admin: Admin | None = None
        self._changed = asyncio.Event()  # a worker exited, or a signal came

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._listening = [bind_listener(route) for route in self.config.routes]
        loop.add_signal_handler(signal.SIGHUP, logger.info, "SIGHUP during start-up: ignored")
        self._directory = tempfile.mkdtemp(prefix="sidecar-workers-")  # 0700: the admin sockets
        self._lifeline = os.pipe()
        signals_seen = 0

        def on_signal(signum: signal.Signals) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen == 1:
                logger.info(
                    "%s: draining %d workers, in-flight calls have up to %gs (again to exit now)",
                    signum.name,
                    len(self._workers),
                    self.config.drain_grace,
                )
            else:
                logger.warning("%s again: the workers exit now", signum.name)
            self._stopping = True
            self._signal_all(signal.SIGTERM)
            self._changed.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            code = await self._start_all()
            if code is not None:
                return code
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            if self.config.admin is not None:
                self._admin = Admin(self.config.admin, WorkersAnswers(self))
                await self._admin.start()
            logger.info(
                "workers: %d serving (pids %s)",
                len(self._workers),
                " ".join(str(worker.pid) for worker in self._workers),
            )
            await self._watch()
            return EXIT_OK if signals_seen == 1 and self._all_exited_cleanly() else EXIT_RUNTIME
        finally:
            await self._end()

    def _reload(self) -> None:
        logger.info("SIGHUP: reloading %d workers", len(self._workers))
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, signum: signal.Signals) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    async def _start_all(self) -> int | None:
        """Start worker 0, then the others: None when all are ready, else the exit code of
        the first that ended (the others are stopped)."""
        first, *others = self._workers
        code = await self._start(first)
        if code is None and others:
            codes = await asyncio.gather(*(self._start(worker) for worker in others))
            code = next((code for code in codes if code is not None), None)
        if self._stopping:
            return EXIT_OK  # a signal came while they started: nothing was served yet
        if code is not None:
            self._stopping = True
            self._signal_all(signal.SIGTERM)
        return code

    async def _start(self, worker: _Worker) -> int | None:
        """Start a process in the worker's place: None once it is ready, else its exit code."""
        loop = asyncio.get_running_loop()
        ready_read, ready_write = os.pipe()
        admin = None
        if self.config.admin is not None:
            admin = os.path.join(self._directory, f"worker-{worker.index}.sock")
        setup = WorkerSetup(
            index=worker.index,
            listening=tuple(tuple(s.fileno() for s in socks) for socks in self._listening),
            admin=admin,
            ready=ready_write,
            lifeline=self._lifeline[0],
        )
        inherited = [fd for fds in setup.listening for fd in fds]
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sidecar",
                *self._argv,
                env={**os.environ, WORKER_ENV: setup.to_env()},
                pass_fds=[*inherited, ready_write, self._lifeline[0]],
                stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # Its own session: a terminal's Ctrl-C reaches the supervisor only, which
                # tells each worker once (twice would be "exit now").
                start_new_session=True,
            )
        finally:
            os.close(ready_write)
        worker.started = loop.time()
        worker.ready = False
        assert worker.process.stderr is not None
        worker.relay = loop.create_task(_relay_lines(worker.process.stderr))
        said = await _read_byte(ready_read)
        if said:
            worker.ready = True
            return None
        code = await worker.process.wait()
        await worker.relay  # its last lines (why it ended) before anything of ours
        return code if code != EXIT_OK else EXIT_RUNTIME

    async def _watch(self) -> None:
        """Until every worker has exited after a signal, start again each that dies."""
        waits = {
            asyncio.ensure_future(worker.process.wait()): worker
            for worker in self._workers
            if worker.process is not None
        }
        restarting: dict[asyncio.Future[Any], _Worker] = {}
        changed = asyncio.ensure_future(self._changed.wait())
        while waits or restarting:
            done, _ = await asyncio.wait(
                {*waits, *restarting, changed}, return_when=asyncio.FIRST_COMPLETED
            )
            if changed in done:
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                if self._stopping:
                    self._close_listeners()
                    for task in restarting:
                        task.cancel()
            for task in done & set(restarting):
                worker = restarting.pop(task)
                if task.cancelled():
                    continue
                if task.exception() is not None:  # a bug, or no process could be made
                    logger.error(
                        "worker %d could not be started again: %s", worker.index, task.exception()
                    )
                    continue
                if worker.process is not None:
                    waits[asyncio.ensure_future(worker.process.wait())] = worker
            for task in done & set(waits):
                worker = waits.pop(task)
                worker.ready = False
                if worker.relay is not None:
                    await worker.relay
                if self._stopping:
                    continue
                restarting[asyncio.ensure_future(self._replace(worker, task.result()))] = worker
        changed.cancel()

    async def _replace(self, worker: _Worker, code: int) -> None:
        """Start another process in a dead worker's place, after its delay."""
        loop = asyncio.get_running_loop()
        lived = loop.time() - worker.started
        if lived >= _LIVED_LONG_SECONDS:
            worker.delay = 0.0
        else:
            worker.delay = min(max(worker.delay * 2, 1.0), _LONGEST_DELAY_SECONDS)
        logger.warning(
            "worker %d (pid %s) %s after %.1fs: starting another%s",
            worker.index,
            worker.pid,
            _ended(code),
            lived,
            f" in {worker.delay:g}s" if worker.delay else "",
        )
        while True:
            await asyncio.sleep(worker.delay)
            worker.restarts += 1
            start_code = await self._start(worker)
            if start_code is None:
                logger.info("worker %d started again (pid %s)", worker.index, worker.pid)
                return
            worker.delay = min(max(worker.delay * 2, 1.0), _LONGEST_DELAY_SECONDS)
            logger.warning(
                "worker %d did not start (%s): trying again in %gs",
                worker.index,
                _ended(start_code),
                worker.delay,
            )

    def _close_listeners(self) -> None:
        """Stop holding the listening sockets: once the workers close theirs, the port is free
        and a new connection is refused, not left waiting in a backlog nobody serves."""
        for socks in self._listening:
            for sock in socks:
                sock.close()
        self._listening = []

    def _all_exited_cleanly(self) -> bool:
        return all(
            worker.process is None or worker.process.returncode == EXIT_OK
            for worker in self._workers
        )

    async def _end(self) -> None:
        if self._admin is not None:
            await self._admin.stop()
        self._stopping = True
        self._signal_all(signal.SIGTERM)
        for worker in self._workers:
            if worker.process is not None:
                await worker.process.wait()
            if worker.relay is not None:
                await worker.relay
        self._close_listeners()
        for route in self.config.routes:
            if route.listen.unix_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(route.listen.unix_path)
        for fd in self._lifeline:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
        logger.info("stopped")

    # What the admin listener asks (WorkersAnswers).

    def workers(self) -> list[_Worker]:
        return self._workers


class WorkersAnswers:
    """The supervisor's admin answers: the workers', added up."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    async def _ask_all(self, target: str) -> list[tuple[_Worker, bytes | None]]:
        """Each worker's answer to GET target on its admin socket (None: it gave none)."""
        workers = self._supervisor.workers()
        directory = self._supervisor._directory
        answers = await asyncio.gather(
            *(
                _ask(os.path.join(directory, f"worker-{worker.index}.sock"), target)
                if worker.ready
                else _none()
                for worker in workers
            )
        )
        return list(zip(workers, answers, strict=True))

    async def not_ready(self) -> list[str]:
        problems: dict[str, None] = {}
        for worker, answer in await self._ask_all("/readyz"):
            if answer is None:
                problems[f"worker {worker.index} is not serving (starting, or it died)"] = None
                continue
            for problem in json.loads(answer).get("not_ready", []):
                problems[problem] = None  # the same problem in every worker, said once
        return list(problems)

    async def metrics(self, openmetrics: bool) -> tuple[str, bytes]:
        texts = [answer for _, answer in await self._ask_all("/metrics") if answer is not None]
        workers = self._supervisor.workers()
        merged = merge_metrics(texts)
        merged.append(
            _gauge("sidecar_workers", "Workers serving now", sum(w.ready for w in workers))
        )
        restarts = Metric("sidecar_worker_restarts", "Workers started again after dying", "counter")
        restarts.add_sample("sidecar_worker_restarts_total", {}, sum(w.restarts for w in workers))
        merged.append(restarts)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(merged))
        return exposition(registry, openmetrics)

    async def status(self) -> dict[str, object]:
        answers = await self._ask_all("/status")
        statuses = [None if answer is None else json.loads(answer) for _, answer in answers]
        first: dict[str, Any] = next((status for status in statuses if status), {})
        return {
            "routes": first.get("routes", []),
            "workers": [
                {
                    "worker": worker.index,
                    "pid": worker.pid,
                    "ready": worker.ready,
                    "restarts": worker.restarts,
                    "last_reload": None if status is None else status.get("last_reload"),
                }
                for (worker, _), status in zip(answers, statuses, strict=True)
            ],
        }


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_metrics(texts: Sequence[bytes]) -> list[Metric]:
    """The workers' metrics (Prometheus text format) as one process's: each series added
    up, but for those one value per process (_TAKEN_ONCE: the earliest is kept)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            series = values[family.name]
            once = family.name in _TAKEN_ONCE
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in series:
                    series[key] = sample.value
                elif once:
                    series[key] = min(series[key], sample.value)
                else:
                    series[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def _gauge(name: str, documentation: str, value: float) -> Metric:
    gauge = Metric(name, documentation, "gauge")
    gauge.add_sample(name, {}, value)
    return gauge


async def _none() -> None:
    return None


async def _ask(path: str, target: str) -> bytes | None:
    """The body of a worker admin listener's answer to GET target; None if it gave none."""
    try:
        answer = await asyncio.wait_for(_get(path, target), _ASK_SECONDS)
    except (OSError, asyncio.TimeoutError):
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")):
        return None
    return body


async def _get(path: str, target: str) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
        return await reader.read()  # the admin listener closes after one answer
    finally:
        writer.close()


async def _read_byte(fd: int) -> bytes:
    """One byte from a pipe, or b"" at its end; the descriptor is closed after."""
    loop = asyncio.get_running_loop()
    read: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 1)
        except OSError:
            data = b""
        if not read.done():
            read.set_result(data)

    loop.add_reader(fd, readable)
    try:
        return await read
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _relay_lines(stream: asyncio.StreamReader) -> None:
    """A worker's stderr, written on in whole lines (with the supervisor's own)."""
    tail = b""
    while chunk := await stream.read(_LONGEST_LINE):
        data = tail + chunk
        cut = data.rfind(b"\n") + 1
        if cut:
            logs.write_lines(data[:cut].decode("utf-8", "backslashreplace"))
        tail = data[cut:]
        if len(tail) > _LONGEST_LINE:  # no line end in sight: cut it here
            logs.write_lines(tail.decode("utf-8", "backslashreplace") + "\n")
            tail = b""
    if tail:
        logs.write_lines(tail.decode("utf-8", "backslashreplace") + "\n")


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
