"""A worker's side of `workers: N` (runtime/workers.py): what it inherits from its supervisor.

The supervisor names it all in _SIDECAR_WORKER: the listening sockets it bound, a
pipe to say "ready" on, a lifeline (a pipe it never writes: its end means the
supervisor is gone, and the worker drains and exits), the private unix socket the
worker's admin listener serves the supervisor on, the configuration file's content as
the supervisor last accepted it (so that a worker started again runs what the others
run, not a file edited since), and the secret its TLS session tickets are encrypted
with (so that a caller resumes its session whichever worker accepts it). A worker
drains on SIGTERM or SIGINT, as often as they come (systemd signals the whole group,
and the supervisor signals again); it exits at once on EXIT_NOW, which only the
supervisor sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
from collections.abc import Mapping

from sidecar.config.addresses import parse_address
from sidecar.config.model import Config
from sidecar.errors import ConfigError
from sidecar.pki.tls import TICKET_SECRET_LENGTH, share_session_tickets

logger = logging.getLogger("sidecar.server")

# Not SIDECAR_...: the settings are read from those, and this is no setting.
WORKER_ENV = "_SIDECAR_WORKER"
EXIT_NOW = signal.SIGUSR2


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """What a worker inherits from its supervisor (passed in WORKER_ENV)."""

    index: int
    listening: tuple[tuple[int, ...], ...]  # each route's listening sockets' descriptors
    admin: str | None  # the unix socket its admin listener serves the supervisor on
    ready: int  # a pipe: one byte written when every route serves
    lifeline: int  # a pipe that ends when the supervisor does
    config: str | None  # the config file as last accepted by the supervisor (a copy)
    tickets: str | None  # a file: the secret the workers' session ticket keys derive from

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WorkerSetup | None:
        raw = environ.get(WORKER_ENV)
        if raw is None:
            return None
        try:
            fields = json.loads(raw)
            return cls(
                index=int(fields["index"]),
                listening=tuple(tuple(int(fd) for fd in fds) for fds in fields["listening"]),
                admin=fields["admin"],
                ready=int(fields["ready"]),
                lifeline=int(fields["lifeline"]),
                config=fields["config"],
                tickets=fields.get("tickets"),
            )
        except (ValueError, TypeError, KeyError):
            raise ConfigError(
                f"{WORKER_ENV} is set, but not by a sidecar supervisor: unset it"
            ) from None

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

    def config_bytes(self) -> bytes | None:
        """The config file's content the supervisor accepted (None: there is no file)."""
        if self.config is None:
            return None
        try:
            with open(self.config, "rb") as accepted:
                return accepted.read()
        except OSError as error:  # its supervisor's directory was removed under it
            raise ConfigError(f"{WORKER_ENV}: {self.config}: {error.strerror}") from None

    def share_session_tickets(self) -> None:
        """Encrypt session tickets as every other worker of the supervisor does; without the
        supervisor's secret (one of an older version, a directory removed under it), with
        keys of its own: a caller then resumes only on the worker that issued its ticket."""
        secret = b""
        if isinstance(self.tickets, str):
            with contextlib.suppress(OSError), open(self.tickets, "rb") as file:
                secret = file.read(TICKET_SECRET_LENGTH + 1)
        if len(secret) == TICKET_SECRET_LENGTH:
            share_session_tickets(secret)
        else:
            logger.warning("worker %d: no session ticket secret from the supervisor: tickets "
                           "resume on this worker only", self.index)  # fmt: skip

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
