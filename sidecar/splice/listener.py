"""A route's listener on the spliced data plane: accept, terminate TLS, decide, hand over.

Ingress: each connection's TLS handshake runs here (Python's ssl on the socket
itself: handshake.py, then tls_transport.py), with a client certificate required
and verified against the CA bundle (the route's credentials as they are at that
handshake). The caller's identity is
read once per connection and the route's policy admits it or not
(`Policy.admits`): an admitted caller's connection is spliced to the upstream
(connection.Splice), a refused caller's is answered PERMISSION_DENIED, call by
call, with the reason (refusal.Refusal), and never reaches the upstream. Both
are a `ConnectionHandler` to the connection's protocol. Egress: plaintext
callers on loopback are spliced to the remote over TLS with this route's client
certificate.

The listener keeps every open connection, so that a drain can tell each caller to
start no new calls and wait for those in flight. Each connection accepted is
admitted within the listener's budgets first (admission.py: handshakes pending,
connections, descriptors); the peer's certificate chain is capped in OpenSSL
(`max_chain_length`, pki/tls.py), and each handshake is watched (handshake.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable
from typing import Protocol

import grpc

from sidecar.auth.forwarded import xfcc
from sidecar.auth.headers import IDENTITY_FIELD
from sidecar.auth.identity import IdentityReader, PeerIdentity
from sidecar.auth.policy import Decision, Policy
from sidecar.config.addresses import Address
from sidecar.config.model import RouteConfig
from sidecar.dataplane import RouteParts, Serving, log_shared_port
from sidecar.errors import StartupError
from sidecar.h2.headerblock import RequestFilter
from sidecar.host.allocator import release_free_memory
from sidecar.host.ports import bind_tcp
from sidecar.observe.connections import UpstreamFailure
from sidecar.observe.logs import escape
from sidecar.pki.tls import TLSMaterial, cap_peer_chain, read_ahead, share_ticket_keys
from sidecar.splice.admission import Admission
from sidecar.splice.connection import (
    WRITE_BUFFER_HIGH,
    Splice,
    UpstreamClosedEarly,
    UpstreamNotHttp2,
    UpstreamSilent,
)
from sidecar.splice.handshake import Handshake, report_failure
from sidecar.splice.refusal import Refusal
from sidecar.splice.tls_transport import TLSTransport

logger = logging.getLogger("sidecar.server")

# How long accepting pauses after accept() failed (out of descriptors, say): connections
# end meanwhile, and callers arriving in the pause wait at most this long to be closed.
_ACCEPT_PAUSE_SECONDS = 0.1
# How long a stop waits for TLS handshakes under way to finish (a real client's takes
# milliseconds; one that never sends its hello must not hold the stop for
# handshake_timeout).
_HANDSHAKE_FINISH_SECONDS = 1.0
# Closed connections that make a burst worth giving memory back for.
_BURST = 256


def _remote_of(sock: socket.socket, address: object) -> str:
    """The caller's address as gRPC names peers: ipv4:127.0.0.1:53412, ipv6:[::1]:53412
    (address: as accept() returned it)."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = address[:2]  # type: ignore[index]
    return f"ipv6:[{host}]:{port}" if sock.family == socket.AF_INET6 else f"ipv4:{host}:{port}"


def _failure_details(error: BaseException | None, connect_timeout: float) -> str:
    """A transport failure in a few words: strerror for OS errors, ssl's reason for TLS."""
    if isinstance(error, ssl.SSLError):
        return str(error).split(" (_ssl.c:")[0]
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    if isinstance(error, TimeoutError | asyncio.TimeoutError) and not str(error):
        return f"no connection within {connect_timeout:g}s"  # wait_for's, which says nothing
    return str(error) or type(error).__name__


def upstream_failure(error: BaseException | None) -> UpstreamFailure:
    """What kind of failure to reach the upstream, from a bounded set (the metrics' label)."""
    if isinstance(error, UpstreamNotHttp2):
        return "not_http2"
    if isinstance(error, UpstreamSilent):
        return "silent"
    if isinstance(error, UpstreamClosedEarly):
        return "closed"
    if isinstance(error, ssl.SSLError):
        return "tls"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(error, OSError):
        return "unreachable"
    return "other"


class ConnectionHandler(Protocol):
    """What a caller's connection is handed to once set up: a Splice (the caller's calls
    reach the upstream) or a Refusal (each call is answered here, then the close)."""

    def feed(self, data: bytes) -> None: ...

    def connection_lost(self) -> None: ...

    @property
    def calls_seen(self) -> int:
        """Calls the caller started on this connection (relayed or answered here)."""
        ...

    def caller_busy(self) -> None:
        """The caller's write buffer is full (it does not read)."""

    def caller_ready(self) -> None: ...

    def drain(self) -> None:
        """The sidecar is stopping: no new calls; close once those in flight are over."""

    def abort(self) -> None:
        """The drain's grace is over."""


class _CallerProtocol(asyncio.Protocol):
    """One caller connection, TLS done (ingress): its handler gets the bytes and events."""

    __slots__ = (
        "_listener", "_opened_at", "_transport", "handler", "identity", "over_limit",
        "released", "remote",
    )  # fmt: skip

    def __init__(self, listener: Listener, remote: str, over_limit: bool = False) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self.handler: ConnectionHandler | None = None
        self.identity: PeerIdentity | None = None  # ingress: the caller, once its TLS is done
        self.remote = remote
        self.over_limit = over_limit  # admitted beyond max_connections: answered, then closed
        self.released = False  # its place among the over-limit connections given back
        self._opened_at: float | None = None  # with --log-level debug: when it opened

    def _closed_debug(self, calls: int) -> None:
        assert self._opened_at is not None
        seconds = round(time.monotonic() - self._opened_at, 3)
        logger.debug(
            "connection from %s closed after %gs, %d calls",
            self.remote,
            seconds,
            calls,
            extra={"fields": {"event": "connection_closed", "remote": self.remote,
                              "seconds": seconds, "calls": calls}},
        )  # fmt: skip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._set_up(transport)
        if logger.isEnabledFor(logging.DEBUG):
            self._opened_at = time.monotonic()
            what = "spliced" if isinstance(self.handler, Splice) else "refused"
            if self.over_limit:
                what += " (over max_connections)"
            elif self.identity is not None and what == "refused":
                what += " (denied)"
            peer = self.identity.description if self.identity is not None else "-"
            tls = transport.get_extra_info("ssl_object")
            resumed = tls is not None and tls.session_reused
            logger.debug(
                "connection from %s opened: peer %s, %s%s",
                self.remote,
                peer,
                what,
                ", TLS session resumed" if resumed else "",
                extra={"fields": {"event": "connection_opened", "remote": self.remote,
                                  "peer": peer, "handling": what, "resumed": resumed}},
            )  # fmt: skip
        if self._listener.draining:  # its handshake was under way when the listener stopped
            self.drain()

    def _set_up(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        assert self._transport is not None
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH)  # type: ignore[attr-defined]
        listener = self._listener
        listener.connections.add(self)
        listener.parts.connections.opened()
        if self.over_limit:
            self.handler = listener.admission.refusal(self._transport, self.remote)
            return
        if not listener.parts.ingress:  # egress: local callers are the app itself
            self._splice("-")
            return
        der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        self.identity = identity = listener.identities.from_der(der)
        policy = listener.parts.policy
        if policy.admits(identity):
            injected = None
            if listener.config.identity_header:
                fields = listener.config.identity_header_fields
                injected = (IDENTITY_FIELD, xfcc(identity, fields).encode("ascii"))
            splice = self._splice(identity.description, injected)
            if policy.per_call(identity):  # the method rules may deny some of its calls
                splice.authorize(functools.partial(policy.decide, identity))
            return
        listener.denied[self] = None  # the first to go when the listener is full
        listener.parts.connections.refused("denied")
        self.handler = Refusal(
            self._transport,
            grpc.StatusCode.PERMISSION_DENIED,
            functools.partial(_denial, policy, identity),
            peer=identity.description,
            remote=self.remote,
            route=listener.config.name,
            goaway=False,
            limits=listener.config.limits,
            observer=listener.parts.observer,
            # Health calls are any verified caller's, unless its certificate is revoked.
            serving=_serving(listener.parts.health) if policy.revoked(identity) is None else None,
        )

    def _splice(self, peer: str, injected: tuple[bytes, bytes] | None = None) -> Splice:
        assert self._transport is not None
        self.handler = splice = Splice(
            self._transport,
            self._listener.connect,
            self._listener.describe_failure,
            peer=peer,
            remote=self.remote,
            route=self._listener.config.name,
            request_filter=self._listener.request_filter,
            observer=self._listener.parts.observer,
            upstream_name=str(self._listener.config.upstream),
            limits=self._listener.config.limits,
            injected=injected,
            health=self._listener.parts.health,
            lost=self._listener.upstream_lost,
        )
        return splice

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if handler is not None:  # (set in connection_made, let go in connection_lost)
            handler.feed(data)

    def eof_received(self) -> bool:
        return False  # close; HTTP/2 has no use for a half-closed connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.forget(self)
        if self.handler is not None:
            if self._opened_at is not None:
                self._closed_debug(self.handler.calls_seen)
            self.handler.connection_lost()
        self.handler = None  # the handler points back at the transport, which points here

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.caller_busy()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.caller_ready()

    def drain(self) -> None:
        if self.handler is not None:
            self.handler.drain()
        elif self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self.handler is not None:
            self.handler.abort()
        elif self._transport is not None:
            self._transport.abort()


class Listener:
    """The listener of one route on the spliced data plane, with an explicit lifecycle."""

    def __init__(self, parts: RouteParts) -> None:
        self.parts = parts
        self.config = config = parts.config
        self.limits = config.limits
        self.identities = IdentityReader()
        self.request_filter = RequestFilter(parts.headers)  # shared by the route's splices
        self.connections: set[_CallerProtocol] = set()
        # Denied callers' connections, oldest first: at max_connections the oldest is closed
        # to make room for a newcomer, so that denied callers cannot fill the listener.
        self.denied: dict[_CallerProtocol, None] = {}
        self._peak = 0  # the most connections open at once since memory was last given back
        self._trim: asyncio.TimerHandle | None = None
        self._prepared: ssl.SSLContext | None = None  # the last context given to _tls
        self._sockets: list[socket.socket] = []  # listening
        self._accepting: set[asyncio.Task[None]] = set()  # one accept loop per socket
        self._opening: set[asyncio.Task[None]] = set()  # connections being set up (TLS)
        self.draining = False  # stopped accepting: a connection set up now drains at once
        self.admission = Admission(config.title, config.name, config.limits, parts.observer)
        self._all_gone = asyncio.Event()
        self._tls()  # the first context is prepared (and any warning logged) at start-up

    def _tls(self) -> ssl.SSLContext:
        """The route's TLS context for the next handshake (ingress: with a caller; egress: with
        the remote): the credentials' current one, prepared the first time it is used."""
        credentials = self.parts.credentials.current()
        context = credentials.ssl_context
        if context is not self._prepared:
            self._prepare(context, credentials.material)
            self._prepared = context
        return context

    def _prepare(self, context: ssl.SSLContext, material: TLSMaterial) -> None:
        """Cap the peer's chain in OpenSSL and, for a listener, watch its handshakes and set
        its session tickets (shared with the other workers, when there are)."""
        unsupported = cap_peer_chain(context, self.limits.max_chain_length)
        if unsupported is not None:
            logger.warning(
                "%s: max_chain_length is not enforced on %s chains: %s",
                self.config.title,
                "callers'" if self.parts.ingress else "the remote's",
                unsupported,
            )
        if self.parts.ingress:
            read_ahead(context)
            # OpenSSL sends two by default; each costs a sixth of a full handshake's CPU.
            context.num_tickets = self.config.session_tickets
            share_ticket_keys(context, material, str(self.config.listen))

    async def start(self) -> int:
        """Bind and start accepting; return the port (0 for a unix socket)."""
        listen = self.config.listen
        if self.parts.listening is not None:
            self._sockets = self.parts.listening  # a worker's, bound by its supervisor
        else:
            self._sockets = bind_listener(self.config)
        self.admission.start()
        loop = asyncio.get_running_loop()
        for listening in self._sockets:
            _track(self._accepting, loop.create_task(self._accept(listening)))
        if listen.unix_path is not None:
            return 0
        return int(self._sockets[0].getsockname()[1])

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listening)
            except OSError as error:
                self.admission.accept_failed(listening, error, len(self.connections))
                await asyncio.sleep(_ACCEPT_PAUSE_SECONDS)
                continue
            self.parts.connections.accepted()
            verdict = self.admission.admit(
                len(self.connections), self.parts.ingress, self._evict_denied
            )
            if verdict != "serve":  # closed at once, or answered UNAVAILABLE then closed
                self.parts.connections.refused("limit")
            if verdict == "close":
                sock.close()
                continue
            remote = _remote_of(sock, address)
            _track(self._opening, loop.create_task(self._open(sock, remote, verdict == "refuse")))

    async def _open(self, sock: socket.socket, remote: str, over_limit: bool) -> None:
        """Run the TLS handshake (ingress) and give the connection its protocol."""
        made: list[_CallerProtocol] = []

        def protocol() -> _CallerProtocol:
            made.append(_CallerProtocol(self, remote, over_limit))
            return made[-1]

        try:
            # (TCP_NODELAY and keepalive: the listening socket's, which accept() copies.)
            if not self.parts.ingress:
                await asyncio.get_running_loop().connect_accepted_socket(protocol, sock)
            else:
                await self._handshake(sock, remote, protocol)
        except OSError as error:  # the caller left before its connection was set up
            logger.debug("connection from %s lost before it was set up: %s", remote, error)
            sock.close()  # a no-op once the handshake holds it (the socket is detached)
        finally:
            # A connection that reached its protocol is released by forget(), once; one
            # that did not (a failed or cancelled handshake) here.
            reached = bool(made) and (made[0].released or made[0] in self.connections)
            if over_limit and not reached:
                self.admission.refusal_ended()

    async def _handshake(
        self, sock: socket.socket, remote: str, protocol: Callable[[], _CallerProtocol]
    ) -> bool:
        """The TLS handshake, counted among the pending ones while it runs; whether it
        succeeded (a failure is logged)."""
        started = time.monotonic()
        handshake = Handshake(sock, remote)
        task = asyncio.current_task()
        assert task is not None
        self.admission.handshake_started(handshake, task)
        try:
            tls = await handshake.run(self._tls(), self.limits.handshake_timeout)
        except OSError as error:  # ssl.SSLError and HandshakeTimedOut are OSErrors
            kind = report_failure(handshake, error, self.limits)
            self.parts.connections.handshake_failed(kind)
            self.parts.connections.refused("handshake")
            return False
        finally:
            self.admission.handshake_ended(handshake)
            handshake.done()
        self.parts.connections.handshake_done(time.monotonic() - started)
        TLSTransport(tls, protocol())  # sets the connection up (its protocol's connection_made)
        return True

    async def connect(
        self, factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        """Open one connection to the upstream (TLS for egress) with the protocol given."""
        loop = asyncio.get_running_loop()
        upstream = self.config.upstream
        if upstream.unix_path is not None:
            opening = loop.create_unix_connection(factory, upstream.unix_path)
        elif not self.parts.ingress:
            opening = loop.create_connection(
                factory,
                upstream.host,
                upstream.port,
                ssl=self._tls(),
                server_hostname=self.config.tls_name,
                ssl_handshake_timeout=self.limits.connect_timeout,
            )
        else:
            opening = loop.create_connection(factory, upstream.host, upstream.port)
        transport, protocol = await asyncio.wait_for(opening, self.limits.connect_timeout)
        sock = transport.get_extra_info("socket")
        # A remote that refuses our certificate under TLS 1.3 may have closed the
        # connection already (its alert comes after our side of the handshake): the
        # protocol has heard of it, and the call is answered with the reason.
        if upstream.unix_path is None and sock is not None and not transport.is_closing():
            with contextlib.suppress(OSError):
                _keep_alive(sock)
        return transport, protocol

    async def describe_failure(self, error: BaseException | None) -> str:
        self.parts.connections.upstream_failed(upstream_failure(error))
        details = _failure_details(error, self.limits.connect_timeout)
        return await self.parts.upstream_unavailable(details)

    def upstream_lost(self) -> None:
        """A connection to the upstream was lost with calls in flight (or before it spoke)."""
        self.parts.connections.upstream_failed("lost")

    def credentials_replaced(self) -> None:
        """Ingress: nothing to do (each handshake takes the current credentials; established
        connections keep their TLS session). Egress: each caller's connection drains (no new
        calls, those in flight finish), so that its client reconnects and its calls reach
        the remote over a new connection made with the new certificate and CA."""
        if self.parts.ingress:
            return
        for connection in list(self.connections):
            connection.drain()

    def policy_replaced(self, grace: float) -> None:
        """The allowlist changed: each spliced caller it no longer admits has every new call
        answered PERMISSION_DENIED, its calls in flight up to grace seconds to finish, then
        its connection closes (Splice.revoke); meanwhile it is among the denied, the first
        closed when the listener is full. A caller refused before and admitted now calls on
        its next connection (a refused connection is closed soon: denied_calls,
        denied_lifetime)."""
        policy = self.parts.policy
        revoked: dict[str, int] = {}  # connections, by caller: one log line each
        for connection in list(self.connections):
            handler, identity = connection.handler, connection.identity
            if not isinstance(handler, Splice) or identity is None:
                continue
            if policy.admits(identity):  # the method rules may have changed
                per_call = policy.per_call(identity)
                handler.authorize(functools.partial(policy.decide, identity) if per_call else None)
                continue
            handler.revoke(functools.partial(_denial, policy, identity), grace)
            self.denied[connection] = None
            revoked[identity.description] = revoked.get(identity.description, 0) + 1
        for caller, count in revoked.items():
            logger.info(
                "%s: %s is no longer allowed: new calls on its %d open connection%s are denied, "
                "and each closes once its calls in flight are over (within %gs)",
                self.config.title,
                caller,
                count,
                "" if count == 1 else "s",
                grace,
            )

    def _evict_denied(self) -> str | None:
        """Close the oldest denied caller's connection now, its place given at once; the
        caller's address, or None if no caller is denied."""
        if not self.denied:
            return None
        oldest = next(iter(self.denied))
        del self.denied[oldest]
        self.connections.discard(oldest)
        self.parts.connections.closed()
        oldest.abort()
        return oldest.remote

    def forget(self, connection: _CallerProtocol) -> None:
        if connection in self.connections:
            self.parts.connections.closed()
        self.denied.pop(connection, None)
        if connection in self.connections and connection.over_limit and not connection.released:
            connection.released = True
            self.admission.refusal_ended()
        self.connections.discard(connection)
        if not self.connections:
            self._all_gone.set()
        self._after_burst()

    def _after_burst(self) -> None:
        """Once most of a burst of connections has closed, give their memory back to the
        system (see allocator.release_free_memory), a second after the last of them, so
        that a burst costs one walk of the heap, not one per connection."""
        open_now = len(self.connections)
        if open_now > self._peak:
            self._peak = open_now
        elif self._peak - open_now >= _BURST and open_now <= self._peak // 2:
            if self._trim is not None:
                self._trim.cancel()
            self._trim = asyncio.get_running_loop().call_later(1.0, self._trimmed)

    def _trimmed(self) -> None:
        self._trim = None
        self._peak = len(self.connections)
        release_free_memory()

    async def stop(self, grace: float | None) -> None:
        """Stop accepting; tell callers to start no new calls; wait up to grace for those
        in flight, then end every connection (which cancels what is left upstream).

        A connection accepted before the stop whose TLS handshake is still running is
        let finish it (for a second at most), then drained like the others: in a rolling
        restart, a client that connected as the listener closed gets its call served,
        or a GOAWAY, never a closed connection in the middle of its handshake."""
        loop = asyncio.get_running_loop()
        end = loop.time() + (grace or 0)
        for task in list(self._accepting):
            task.cancel()
        for listening in self._sockets:
            listening.close()
        self.admission.stop()
        inherited = self.parts.listening is not None  # the supervisor's to remove
        if self.config.listen.unix_path is not None and self._sockets and not inherited:
            with contextlib.suppress(OSError):
                os.unlink(self.config.listen.unix_path)
        self._sockets = []
        self.draining = True
        self._all_gone.clear()
        for connection in list(self.connections):
            connection.drain()
        if self._opening and grace:
            await asyncio.wait(list(self._opening), timeout=min(grace, _HANDSHAKE_FINISH_SECONDS))
        for task in list(self._opening):
            task.cancel()
        left = end - loop.time()
        if self.connections and left > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), left)
        for connection in list(self.connections):
            connection.abort()


def _track(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _serving(health: Serving | None) -> Callable[[], bool] | None:
    """What a refused connection answers health calls with: the route's readiness."""
    return None if health is None else lambda: health.serving


def _denial(policy: Policy, identity: PeerIdentity, method: str) -> Decision:
    """Why this caller may not call this method on this connection: what a refused or
    revoked caller's calls are told (the rules of the moment; a caller allowed again since
    the connection was refused or revoked must open a new one)."""
    decision = policy.decide(identity, method)
    if decision.allowed:
        return Decision(
            False,
            f"peer {identity.description} may call {escape(method)} now (the allowlist was "
            "reloaded), but not on this connection, refused before: open a new one",
            rule="refused before a reload",
        )
    return decision


def _keep_alive(sock: socket.socket) -> None:
    """TCP keepalive, on both connections of a splice: PINGs are answered by the sidecar
    on the side they come from, so neither peer's keepalive PINGs cross it. A peer that
    vanished without a FIN (a NAT timeout, a dead host, an egress's remote across a
    partition) is found by TCP after about two minutes of silence, and the other
    connection closed with it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 20), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def bind_listener(config: RouteConfig) -> list[socket.socket]:
    """The route's listening sockets, non-blocking; StartupError if it cannot have them."""
    try:
        sockets, shared = _bind(config.listen)
    except OSError as error:
        raise StartupError(
            f"cannot listen on {config.listen}: {_failure_details(error, 0)} (address in use?)"
        ) from None
    if shared:
        log_shared_port(config)
    return sockets


def _bind(address: Address) -> tuple[list[socket.socket], bool]:
    """Listening sockets for address, and whether another process holds its port already
    (a rolling restart: see host/ports.py)."""
    shared = False
    if address.unix_path is not None:
        path = address.unix_path
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a previous run's socket: bind would fail on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        socks = [sock]
    else:
        socks, shared = bind_tcp(address.host or None, address.port)
    for sock in socks:
        if sock.family != socket.AF_UNIX:
            # Copied by accept() to every caller's socket (Linux and the BSDs do): set
            # once here, not with four system calls per connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keep_alive(sock)
        sock.listen(4096)
        sock.setblocking(False)
    return socks, shared
