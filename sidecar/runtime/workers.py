"""Workers: `workers: N` processes serving every route, started and watched by a supervisor.

The process the user starts becomes the supervisor. It binds each route's listener
and its admin listener (so a port in use fails the start with exit 1, as one process
does), then starts N workers, each `python -m sidecar` with the same arguments and
environment plus what it inherits (runtime/worker.py). Every worker accepts on the
same sockets; the kernel hands each connection to a worker waiting in accept(), so a
worker busy with work takes fewer. Worker 0 starts first, the others once it is
ready: a configuration that fails says so once, and the supervisor exits with the
worker's code.

What one process does, N do:
- SIGTERM or SIGINT drains every worker; a second signal makes them exit at once. A
  worker still running past the drain grace (stopped, say) is killed.
- SIGHUP reloads: the supervisor reads the config file, keeps a copy of what it
  accepts (what a reload may change, runtime/reload.py), and signals every worker,
  which reloads from that copy and reads its credential files. With reload_interval,
  the supervisor checks the file and each worker its credentials and the copy.
- A worker that dies is logged and started again, at once, or after a delay that
  doubles while it keeps dying young; it runs the copy the others run.
- Each worker's stderr is a pipe to the supervisor, which writes whole lines only, so
  lines never interleave; access lines say `worker=N`.
- The admin listener is the supervisor's (runtime/merged_admin.py): the workers'
  answers, added up.

The grpc plane serves from one process: configuration refuses workers > 1 with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sidecar.config.model import Config
from sidecar.config.pem import read_bytes
from sidecar.errors import EXIT_OK, EXIT_RUNTIME, ConfigError
from sidecar.observe import logs
from sidecar.pki.tls import TICKET_SECRET_LENGTH
from sidecar.runtime.admin import Admin
from sidecar.runtime.merged_admin import WorkersAnswers
from sidecar.runtime.reload import needs_restart
from sidecar.runtime.worker import EXIT_NOW, WORKER_ENV, WorkerSetup
from sidecar.splice.listener import bind_listener

logger = logging.getLogger("sidecar.server")

_LIVED_LONG_SECONDS = 10.0  # a worker that dies younger is started again after a delay
_LONGEST_DELAY_SECONDS = 30.0
_EXIT_NOW_SECONDS = 3.0  # after "exit now" (or the drain grace and this), a worker is killed
# A worker's stderr line longer than this is cut (a caller's :path may make an access
# line of ~200 KB; JSON lines longer than this would not parse, but are not made).
_LONGEST_LINE = 1 << 20
_DIRECTORY_PREFIX = "sidecar-workers-"
_TICKET_SECRET = "session-tickets"  # in the private directory

# Reads the configuration from the config file's content given (None: the file as it is).
ConfigLoader = Callable[[bytes | None], Config]


class Worker:
    """One worker's place: the process in it now, and how it has fared."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.restarts = 0
        self.started = 0.0
        self.delay = 0.0  # before the next start, after a death
        self.relay: asyncio.Task[None] | None = None
        self.config_generation = 0  # of the copy it read when it started

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


class Supervisor:
    """Starts the workers, relays their lines, restarts the dead, reloads and drains them."""

    def __init__(
        self, config: Config, config_file: str | None, load: ConfigLoader, argv: Sequence[str]
    ) -> None:
        self.config = config
        self._config_file = config_file
        self._load = load
        self._argv = list(argv)
        self.workers = [Worker(index) for index in range(config.workers)]
        self._listening: list[list[socket.socket]] = []
        self.directory = ""
        self._lifeline = (-1, -1)
        self._accepted = b""  # the config file's content as last accepted
        self._last_read: bytes | str = b""  # ... as last read, or why it could not be
        self._generation = 0  # of the accepted copy
        self._stopping = False
        self._signals = 0
        self._draining: list[Worker] = []  # those serving when the drain began
        self._hup_pending = False
        self._admin: Admin | None = None
        self.answers: WorkersAnswers | None = None
        self._changed = asyncio.Event()  # a signal came
        self._checking: asyncio.Task[None] | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._listening = [bind_listener(route) for route in self.config.routes]
        loop.add_signal_handler(signal.SIGHUP, self._hup_during_start)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            _remove_stale_directories()
            self.directory = tempfile.mkdtemp(prefix=f"{_DIRECTORY_PREFIX}{os.getpid()}-")
            self._write_ticket_secret()
            self._lifeline = os.pipe()
            if self._config_file is not None:
                self._accepted = self._last_read = read_bytes(Path(self._config_file), "--config")
                self.config = self._load(self._accepted)  # what the workers will read
                self._write_accepted()
            if self.config.admin is not None:
                self.answers = WorkersAnswers(self)
                self._admin = Admin(self.config.admin, self.answers)
                await self._admin.start()  # before any worker serves: its port may be taken
            code = await self._start_all()
            if code is not None:
                return code
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            if self._hup_pending:
                self._reload()
            self._check_every(self.config.reload_interval)
            logger.info(
                "workers: %d serving (pids %s)",
                len(self.workers),
                " ".join(str(worker.pid) for worker in self.workers),
            )
            await self._watch()
            return EXIT_OK if self._drained_cleanly() else EXIT_RUNTIME
        finally:
            await self._end()

    # Signals.

    def _hup_during_start(self) -> None:
        logger.info("SIGHUP during start-up: reloading once the workers serve")
        self._hup_pending = True

    def _on_signal(self, signum: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.info(
                "%s: draining %d workers, in-flight calls have up to %gs (again to exit now)",
                signum.name,
                len(self.workers),
                self.config.drain_grace,
            )
            self._stopping = True
            self._draining = [worker for worker in self.workers if worker.ready]
            for worker in self.workers:
                worker.signal(signal.SIGTERM)
            self._close_listeners()
            loop = asyncio.get_running_loop()
            loop.call_later(self.config.drain_grace + _EXIT_NOW_SECONDS, self._kill_all)
        else:
            logger.warning("%s again: the workers exit now", signum.name)
            for worker in self.workers:
                worker.signal(EXIT_NOW)
            asyncio.get_running_loop().call_later(_EXIT_NOW_SECONDS, self._kill_all)
        self._changed.set()

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.running:
                logger.warning("worker %d (pid %s) did not exit: killed", worker.index, worker.pid)
                worker.signal(signal.SIGKILL)

    def _reload(self) -> None:
        logger.info("SIGHUP: reloading %d workers", len(self.workers))
        self._read_config(when_changed=False)
        for worker in self.workers:
            if worker.ready:  # (one starting reads the copy, or is told once ready)
                worker.signal(signal.SIGHUP)

    def _read_config(self, *, when_changed: bool) -> None:
        """Read the config file; keep a copy for the workers if it may be applied in place.
        when_changed (a periodic check): act, and speak, only on content not read before."""
        if self._config_file is None:
            return
        try:
            raw: bytes | str = read_bytes(Path(self._config_file), "--config")
        except ConfigError as error:
            raw = str(error)
        if when_changed and raw == self._last_read:
            return
        self._last_read = raw
        if raw == self._accepted:
            return
        try:
            if isinstance(raw, str):
                raise ConfigError(raw)
            config = self._load(raw)
        except ConfigError as error:
            logger.error("config not reloaded, the running configuration stays: %s", error)
            return
        refusal = needs_restart(self.config, config)
        if refusal is not None:
            logger.error("config not reloaded, the running configuration stays: %s", refusal)
            return
        if config.log_level != self.config.log_level:
            logs.set_level(config.log_level)
        if config.reload_interval != self.config.reload_interval:
            self._check_every(config.reload_interval)
        self.config, self._accepted = config, raw
        self._write_accepted()

    def _write_ticket_secret(self) -> None:
        """The secret every worker derives its session ticket keys from (pki/tls.py), readable
        by this user only, for as long as the supervisor runs."""
        path = os.path.join(self.directory, _TICKET_SECRET)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as secret:
            secret.write(os.urandom(TICKET_SECRET_LENGTH))

    def _write_accepted(self) -> None:
        """The accepted content, where every worker reads it (replaced whole: a worker's
        periodic check never reads half of it)."""
        self._generation += 1
        path = os.path.join(self.directory, "config.yaml")
        with open(f"{path}.new", "wb") as copy:
            copy.write(self._accepted)
        os.replace(f"{path}.new", path)

    def _check_every(self, interval: float) -> None:
        if self._checking is not None:
            self._checking.cancel()
            self._checking = None
        if interval and self._config_file is not None:
            self._checking = asyncio.get_running_loop().create_task(self._check(interval))

    async def _check(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self._read_config(when_changed=True)
            except Exception:  # a bug must not end the checks
                logger.exception("config check failed (a bug: please report it)")

    # Workers.

    async def _start_all(self) -> int | None:
        """Start worker 0, then the others: None when all are ready, else the exit code of
        the first that ended (the others are stopped)."""
        first, *others = self.workers
        code = await self._start(first)
        if code is None and others:
            codes = await asyncio.gather(*(self._start(worker) for worker in others))
            code = next((code for code in codes if code is not None), None)
        if self._stopping:
            return EXIT_OK  # a signal came while they started: nothing was served yet
        if code is not None:
            self._stopping = True
            for worker in self.workers:
                worker.signal(signal.SIGTERM)
        return code

    async def _start(self, worker: Worker) -> int | None:
        """Start a process in the worker's place: None once it is ready, else its exit code.
        OSError: no process could be made."""
        if self._stopping:
            return EXIT_OK  # a drain began: the listeners are closed, there is nothing to serve
        loop = asyncio.get_running_loop()
        ready_read, ready_write = os.pipe()
        admin = None
        if self.config.admin is not None:
            admin = os.path.join(self.directory, f"worker-{worker.index}.sock")
        config = os.path.join(self.directory, "config.yaml") if self._config_file else None
        setup = WorkerSetup(
            index=worker.index,
            listening=tuple(tuple(s.fileno() for s in socks) for socks in self._listening),
            admin=admin,
            ready=ready_write,
            lifeline=self._lifeline[0],
            config=config,
            tickets=os.path.join(self.directory, _TICKET_SECRET),
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
                # Its own session: a terminal's Ctrl-C reaches the supervisor only.
                start_new_session=True,
            )
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)
        worker.started = loop.time()
        worker.ready = False
        worker.config_generation = self._generation
        assert worker.process.stderr is not None
        worker.relay = loop.create_task(_relay_lines(worker.process.stderr))
        if await _read_byte(ready_read):
            worker.ready = True
            if worker.config_generation != self._generation:  # accepted while it started
                worker.signal(signal.SIGHUP)
            return None
        code = await worker.process.wait()
        await worker.relay  # its last lines (why it ended) before anything of ours
        return code if code != EXIT_OK else EXIT_RUNTIME

    async def _watch(self) -> None:
        """Until every worker has exited after a signal, start again each that dies."""
        waits = {
            asyncio.ensure_future(worker.process.wait()): worker
            for worker in self.workers
            if worker.process is not None
        }
        restarting: dict[asyncio.Future[None], Worker] = {}
        changed: asyncio.Future[Any] = asyncio.ensure_future(self._changed.wait())
        while waits or restarting:
            pending: set[asyncio.Future[Any]] = {*waits, *restarting, changed}
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if changed in done:
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                if self._stopping:
                    for task in restarting:
                        task.cancel()
            for task in done & set(restarting):
                worker = restarting.pop(task)
                if not task.cancelled() and worker.process is not None:
                    waits[asyncio.ensure_future(worker.process.wait())] = worker
            for task in done & set(waits):
                worker = waits.pop(task)
                worker.ready = False
                if worker.relay is not None:
                    await worker.relay
                if self.answers is not None and worker.pid is not None:
                    self.answers.retire(worker.index, worker.pid)
                if not self._stopping:
                    replacing = asyncio.ensure_future(self._replace(worker, task.result()))
                    restarting[replacing] = worker
        changed.cancel()

    async def _replace(self, worker: Worker, code: int) -> None:
        """Start another process in a dead worker's place, after its delay, until one is
        ready (cancelled by a drain)."""
        lived = asyncio.get_running_loop().time() - worker.started
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
            failure: int | str | None
            try:
                failure = await self._start(worker)
            except OSError as error:  # out of descriptors or processes, say
                failure = f"it could not be started: {error}"
            if failure is None:
                logger.info("worker %d started again (pid %s)", worker.index, worker.pid)
                return
            if self._stopping:
                return
            worker.delay = min(max(worker.delay * 2, 1.0), _LONGEST_DELAY_SECONDS)
            logger.warning(
                "worker %d did not start (%s): trying again in %gs",
                worker.index,
                failure if isinstance(failure, str) else _ended(failure),
                worker.delay,
            )

    def _close_listeners(self) -> None:
        """Stop holding the listening sockets: once the workers close theirs, the port is free
        and a new connection is refused, not left waiting in a backlog nobody serves."""
        for socks in self._listening:
            for sock in socks:
                sock.close()
        self._listening = []

    def _drained_cleanly(self) -> bool:
        """One signal, and every worker serving when it came exited 0 (not one that died
        before, or one starting again, which a drain stops before it serves)."""
        return self._signals == 1 and all(
            worker.process is not None and worker.process.returncode == EXIT_OK
            for worker in self._draining
        )

    async def _end(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
        if self._admin is not None:
            await self._admin.stop()
        self._stopping = True
        running = [worker for worker in self.workers if worker.running]
        for worker in running:
            worker.signal(signal.SIGTERM)
        if running:
            loop = asyncio.get_running_loop()
            killing = loop.call_later(self.config.drain_grace + _EXIT_NOW_SECONDS, self._kill_all)
            for worker in running:
                assert worker.process is not None
                await worker.process.wait()
            killing.cancel()
        for worker in self.workers:
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
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        logger.info("stopped")


def _remove_stale_directories() -> None:
    """The private directories of supervisors that were killed (a worker cannot remove its
    supervisor's): named after their supervisor's pid, removed once it is gone."""
    base = Path(tempfile.gettempdir())
    for directory in base.glob(f"{_DIRECTORY_PREFIX}*-*"):
        pid = directory.name[len(_DIRECTORY_PREFIX) :].split("-", 1)[0]
        try:
            if not pid.isdigit() or directory.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except PermissionError:
            pass  # another user's process has that pid now: the directory is not ours


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
    while chunk := await stream.read(65536):
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
