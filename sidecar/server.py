"""The sidecar's lifecycle: build the listener and the relay, serve, drain on a signal.

`Sidecar` has an explicit lifecycle (`start`, `stop(grace)`) and is an async
context manager for embedding; `run` adds the signal handling of the process:
the first SIGTERM or SIGINT stops accepting and lets in-flight calls finish for
up to the drain grace, a second one exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from types import TracebackType

from grpc import aio

from sidecar.config import Config
from sidecar.errors import EXIT_OK, EXIT_RUNTIME, StartupError
from sidecar.policy import Policy
from sidecar.relay import Relay
from sidecar.tls import ServerCredentialStore, load_tls_material
from sidecar.upstream import Upstream

logger = logging.getLogger(__name__)

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # A second instance on the same port would silently take half the connections.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Long-lived idle streams: accept clients' keepalive pings (even without calls)
    # instead of answering them with GOAWAY too_many_pings, and ping idle clients
    # ourselves so a vanished peer is noticed. No idle timeout: an idle stream stays.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


class Sidecar:
    """One ingress route: mTLS listener, allowlist, relay to the upstream."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Read and validate certificates first: a bad file is a ConfigError before
        # anything is bound.
        self._credentials = ServerCredentialStore(
            load_tls_material(config.cert, config.key, config.ca)
        )
        self._server: aio.Server | None = None
        self._upstream: Upstream | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Bind the listener and start serving; grpc objects are made inside the running loop."""
        self._upstream = Upstream(self.config.upstream)
        relay = Relay(self._upstream, Policy(self.config.allow))
        self._server = aio.server(handlers=[relay], options=SERVER_OPTIONS)
        listen = self.config.listen
        try:
            self.port = self._server.add_secure_port(
                listen.target, self._credentials.server_credentials()
            )
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {listen}: {exc} (address in use?)") from None
        await self._server.start()
        logger.info(
            "ingress listening on %s:%d (mTLS, client certificate required), relaying to %s; %s",
            listen.host,
            self.port,
            self.config.upstream,
            _describe_rules(self.config),
        )

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, let in-flight calls finish for up to grace seconds, then cancel them."""
        if self._server is not None:
            await self._server.stop(grace)
        if self._upstream is not None:
            await self._upstream.close()
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


def _describe_rules(config: Config) -> str:
    rules = config.allow
    if rules.allow_all:
        return "allow-all: any certificate signed by the CA may call"
    parts = [
        f"{kind}={','.join(patterns)}"
        for kind, patterns in (
            ("allow-cn", rules.cn),
            ("allow-dns", rules.dns),
            ("allow-uri", rules.uri),
        )
        if patterns
    ]
    return "allow " + " ".join(parts)


async def run(config: Config) -> int:
    """Serve until SIGTERM/SIGINT, drain, and return the process exit code."""
    sidecar = Sidecar(config)
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

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop_requested.wait()
    await sidecar.stop(config.drain_grace)
    return EXIT_OK
