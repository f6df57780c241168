"""One caller's TLS handshake on a listener: run it, note what the caller showed, end it cleanly.

OpenSSL runs the handshake on the socket itself (an `ssl.SSLSocket`, non-blocking;
the event loop says when it is readable or writable), and the connection then
becomes a `TLSTransport` (tls_transport.py). When OpenSSL refuses a caller (its
certificate, its chain, its TLS version) it has sent a TLS alert saying why; the
handshake then sends a FIN and reads the caller's unread input away before the
socket is closed, so that the close is a clean one: with input unread, the kernel
would answer the close with a reset, and the caller could lose the alert. No second
descriptor is needed for any of it (a pending handshake holds one).

The handshake also notes whether the caller sent anything at all, so that a TCP
probe (a connect and close with no ClientHello: a port check, a load balancer's
health check) is not reported as a failed handshake, and words each failure
for the log, where failures are WARNINGs rate-limited per caller and reason.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from sidecar.config.limits import Limits
from sidecar.observe.connections import HandshakeFailure
from sidecar.observe.loglimit import LogLimiter
from sidecar.pki.tls import max_chain_bytes

logger = logging.getLogger("sidecar.server")
# Unauthenticated callers can fail thousands of handshakes a second.
_failures = LogLimiter(logger)
# Input read away from a refused caller before the close (more is answered by a reset).
_DRAIN_BYTES = 256 * 1024


class HandshakeTimedOut(TimeoutError):
    """The caller did not finish its handshake within handshake_timeout."""


class Handshake:
    """What the listener knows of one caller's handshake while it runs."""

    __slots__ = ("_expired", "_waiter", "answered", "remote", "sock", "spoke")

    def __init__(self, sock: socket.socket, remote: str) -> None:
        self.sock: socket.socket | None = sock
        self.remote = remote
        self.spoke = False  # the caller sent bytes (a ClientHello, or an attempt at one)
        self.answered = False  # the sidecar answered its ClientHello
        self._waiter: asyncio.Future[None] | None = None
        self._expired: HandshakeTimedOut | None = None  # set when the timeout passed

    def done(self) -> None:
        self.sock = None

    async def run(self, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
        """Run the handshake within timeout (else HandshakeTimedOut); the socket, now TLS.
        On any failure the socket is closed (a refused caller's cleanly: see refuse)."""
        sock = self.sock
        assert sock is not None
        try:
            # A caller already gone would make wrap_socket fail after it took the socket
            # (detached), leaving the descriptor to the garbage collector.
            sock.getpeername()
        except OSError:
            sock.close()
            raise ConnectionResetError("the caller left before its handshake") from None
        # The socket's descriptor moves to the SSLSocket (sock is detached).
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        loop = asyncio.get_running_loop()
        fd = tls.fileno()
        timer = loop.call_later(timeout, self._time_out, timeout)
        try:
            while True:
                if not self.spoke and not self._peek(tls):
                    await self._ready(loop, fd, writable=False)
                    continue
                try:
                    tls.do_handshake()
                    return tls
                except ssl.SSLWantReadError:
                    # The ClientHello was read whole when a cipher is chosen: the answer
                    # (ServerHello to Finished) went out with the same call.
                    self.answered = self.answered or tls.cipher() is not None
                    await self._ready(loop, fd, writable=False)
                except ssl.SSLWantWriteError:
                    await self._ready(loop, fd, writable=True)
        except ssl.SSLError:
            self.answered = self.answered or tls.cipher() is not None
            self.refuse(tls)
            tls.close()
            raise
        except BaseException:  # the caller left, the timeout, or a cancel (admission)
            tls.close()
            raise
        finally:
            timer.cancel()

    def _peek(self, tls: ssl.SSLSocket) -> bool:
        """Whether the caller has sent something or closed (then it is known whether it
        spoke); False while nothing has come yet."""
        try:
            first = socket.socket.recv(tls, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:  # reset: the handshake's read says so
            return True
        self.spoke = bool(first)
        return True

    async def _ready(self, loop: asyncio.AbstractEventLoop, fd: int, writable: bool) -> None:
        add, remove = (loop.add_writer, loop.remove_writer) if writable else (
            loop.add_reader, loop.remove_reader)  # fmt: skip
        self._waiter = waiter = loop.create_future()
        add(fd, _wake, waiter)
        try:
            await waiter
        finally:
            remove(fd)
            self._waiter = None
        # The timeout may have come in the loop turn that woke the waiter: it found the
        # waiter done already (and is not set again); a caller trickling bytes would
        # otherwise keep its handshake, and its descriptor, for good.
        if self._expired is not None:
            raise self._expired

    def _time_out(self, timeout: float) -> None:
        self._expired = HandshakeTimedOut(f"no handshake within {timeout:g}s")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._expired)

    def refuse(self, tls: ssl.SSLSocket) -> None:
        """The handshake failed, and OpenSSL has sent the alert saying why: send a FIN and
        read the caller's unread input away, so that the close that follows is clean."""
        try:
            socket.socket.shutdown(tls, socket.SHUT_WR)
            drained = 0
            while drained < _DRAIN_BYTES and (
                chunk := socket.socket.recv(tls, 65536, socket.MSG_DONTWAIT)
            ):
                drained += len(chunk)
        except OSError:  # gone already, or nothing left to read: the close does the rest
            pass


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def report_failure(handshake: Handshake, error: BaseException, limits: Limits) -> HandshakeFailure:
    """Log a failed handshake: a WARNING (rate-limited per caller address and reason), or
    a DEBUG line for a caller that never sent a byte (a TCP probe); its kind (for the
    metrics). In JSON the line carries event, remote, kind and reason as fields."""
    host = handshake.remote.rsplit(":", 1)[0]
    kind = failure_kind(error, handshake)
    if not handshake.spoke:
        if isinstance(error, HandshakeTimedOut):
            reason = f"no TLS ClientHello within {limits.handshake_timeout:g}s (handshake_timeout)"
            _failures.log(
                logging.INFO,
                ("silent", host),
                "connection from %s closed: %s",
                handshake.remote,
                reason,
                extra=_fields(handshake, kind, reason),
            )
        else:
            logger.debug("connection from %s closed before any TLS ClientHello", handshake.remote)
        return kind
    reason = explain(error, handshake, limits)
    _failures.log(
        logging.WARNING,
        (host, reason),
        "TLS handshake with %s failed: %s",
        handshake.remote,
        reason,
        extra=_fields(handshake, kind, reason),
    )
    return kind


def _fields(handshake: Handshake, kind: str, reason: str) -> dict[str, object]:
    return {
        "fields": {
            "event": "handshake_failed",
            "remote": handshake.remote,
            "kind": kind,
            "reason": reason,
        }
    }


# OpenSSL's reasons for a handshake that was not TLS as gRPC speaks it.
_PROTOCOL_REASONS = frozenset({
    "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL",
    "NO_SHARED_CIPHER", "VERSION_TOO_LOW", "NO_APPLICATION_PROTOCOL", "UNEXPECTED_MESSAGE",
    "UNEXPECTED_RECORD", "NO_PROTOCOLS_AVAILABLE", "TLSV1_ALERT_PROTOCOL_VERSION",
})  # fmt: skip


def failure_kind(error: BaseException, handshake: Handshake) -> HandshakeFailure:
    """What kind of failure, from a bounded set (the metrics' label)."""
    if not handshake.spoke:
        return "silent"
    if isinstance(error, HandshakeTimedOut):
        return "timeout"
    if isinstance(error, ConnectionResetError | ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "closed"
    if not isinstance(error, ssl.SSLError):
        return "other"
    reason = error.reason or ""
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no_certificate"
    if reason == "EXCESSIVE_MESSAGE_SIZE" and handshake.answered:
        return "chain_too_long"
    if reason in _PROTOCOL_REASONS:
        return "protocol"
    if "_ALERT_" in reason:
        # An alert the caller sent: it refused the sidecar (its certificate, most often:
        # a client that does not trust the CA, or checks a name the certificate lacks).
        return "rejected_by_caller"
    verify = getattr(error, "verify_message", None) or ""
    if verify == "certificate chain too long":
        return "chain_too_long"
    if "expired" in verify or "not yet valid" in verify:
        return "expired"
    if "issuer" in verify or "self-signed" in verify or "self signed" in verify:
        return "unknown_ca"
    if reason == "CERTIFICATE_VERIFY_FAILED" or "CERTIFICATE" in reason:
        return "bad_certificate"
    return "other"


def explain(error: BaseException, handshake: Handshake, limits: Limits) -> str:
    """A failed handshake in a few words (OpenSSL's reason, plainer where it is cryptic)."""
    max_chain_length = limits.max_chain_length
    if isinstance(error, ConnectionResetError | ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "the caller closed the connection during the handshake"
    if isinstance(error, ssl.SSLError):
        reason = error.reason or ""
        if reason == "EXCESSIVE_MESSAGE_SIZE" and handshake.answered:
            # The only large message a client sends after the ServerHello: its chain.
            return (
                f"certificate chain too long: over {max_chain_bytes(max_chain_length)} bytes "
                f"(max_chain_length {max_chain_length})"
            )
        verify = getattr(error, "verify_message", None)
        if verify == "certificate chain too long":
            return (
                f"certificate chain too long: over {max_chain_length} certificates "
                "(max_chain_length)"
            )
        return str(error).split(" (_ssl.c:")[0]
    if isinstance(error, HandshakeTimedOut):
        return f"the handshake took longer than {limits.handshake_timeout:g}s (handshake_timeout)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
