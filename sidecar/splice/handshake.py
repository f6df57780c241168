"""One caller's TLS handshake on a listener: what the caller showed, and a clean end if it fails.

The event loop (uvloop) runs each handshake over an `ssl.SSLObject`. When OpenSSL
refuses a caller (its certificate, its chain, its TLS version) it writes a TLS
alert saying why into the connection's outgoing buffer, and the loop then aborts
the connection without sending it; with input the caller sent after its side of
the handshake still unread, the kernel answers the close with a reset. The
listener's contexts create `WatchedSSLObject`s instead, which see the failure
as it happens, while the socket is still open: they send the alert, then a FIN,
and read away the caller's unread input, so the loop's close that follows is a
clean one. No second descriptor is needed for that (a pending handshake holds one).

The watch also notes whether the caller sent anything at all, so that a TCP
probe (a connect and close with no ClientHello: a port check, a load balancer's
health check) is not reported as a failed handshake, and words each failure
for the log, where failures are WARNINGs rate-limited per caller and reason.
"""

from __future__ import annotations

import contextvars
import logging
import socket
import ssl
from typing import Any

from sidecar.auth.identity import PeerCertificateTolerantSSLObject
from sidecar.config.limits import Limits
from sidecar.observe.connections import HandshakeFailure
from sidecar.observe.loglimit import LogLimiter
from sidecar.pki.tls import max_chain_bytes

logger = logging.getLogger("sidecar.server")
# Unauthenticated callers can fail thousands of handshakes a second.
_failures = LogLimiter(logger)
# Input read away from a refused caller before the close (more is answered by a reset).
_DRAIN_BYTES = 256 * 1024

_watching: contextvars.ContextVar[Handshake | None] = contextvars.ContextVar(
    "sidecar_handshake", default=None
)


def current_handshake() -> Handshake | None:
    """The handshake of the connection whose callback is running (its protocol's
    connection_made runs in a copy of the context the handshake was watched in)."""
    return _watching.get()


class Handshake:
    """What the listener knows of one caller's handshake while it runs."""

    __slots__ = ("answered", "remote", "sock", "spoke")

    def __init__(self, sock: socket.socket, remote: str) -> None:
        self.sock: socket.socket | None = sock
        self.remote = remote
        self.spoke = False  # the caller sent bytes (a ClientHello, or an attempt at one)
        self.answered = False  # the sidecar answered its ClientHello

    def watch(self) -> None:
        """Watch the handshake the event loop starts next in the current context (the
        loop runs a connection's callbacks, and creates its SSLObject, in a copy of it)."""
        _watching.set(self)

    def done(self) -> None:
        self.sock = None

    def refuse(self, alert: bytes) -> None:
        """The handshake failed and the event loop is about to close the socket: send the
        alert OpenSSL wrote, a FIN, and read the caller's unread input away."""
        sock = self.sock
        if sock is None:
            return
        # Written past the loop, straight to the socket: the loop has nothing of this
        # connection left to write (its handshake flight, a few KiB, went out whole into
        # a socket buffer far larger; were it not, for a caller advertising a tiny
        # window, that caller alone would read a garbled end), and it drops its
        # transport without writing again.
        try:
            if alert:
                sock.send(alert, socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < _DRAIN_BYTES and (chunk := sock.recv(65536, socket.MSG_DONTWAIT)):
                drained += len(chunk)
        except OSError:  # gone already, or nothing left to read: the close does the rest
            pass


class WatchedSSLObject(PeerCertificateTolerantSSLObject):
    """An SSLObject that tells its connection's `Handshake` what happens (see the module);
    its decoded peer certificate survives names that are not UTF-8 (see the parent)."""

    _handshake: Handshake | None
    _incoming_bio: ssl.MemoryBIO
    _outgoing_bio: ssl.MemoryBIO

    @classmethod
    def _create(
        cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any, **kwargs: Any
    ) -> WatchedSSLObject:
        created: WatchedSSLObject = super()._create(  # type: ignore[misc]
            incoming, outgoing, *args, **kwargs
        )
        created._handshake = _watching.get()
        created._incoming_bio = incoming
        created._outgoing_bio = outgoing
        return created

    def do_handshake(self) -> None:
        handshake = self._handshake
        if handshake is None:
            super().do_handshake()
            return
        if self._incoming_bio.pending:
            handshake.spoke = True
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            if self._outgoing_bio.pending:
                handshake.answered = True
            raise
        except ssl.SSLError:
            self._handshake = None
            handshake.refuse(self._outgoing_bio.read())
            raise
        self._handshake = None


def watch_handshakes(context: ssl.SSLContext) -> None:
    """Make context's connections tell their `Handshake` what happens."""
    context.sslobject_class = WatchedSSLObject


def report_failure(handshake: Handshake, error: BaseException, limits: Limits) -> HandshakeFailure:
    """Log a failed handshake: a WARNING (rate-limited per caller address and reason), or
    a DEBUG line for a caller that never sent a byte (a TCP probe); its kind (for the
    metrics). In JSON the line carries event, remote, kind and reason as fields."""
    host = handshake.remote.rsplit(":", 1)[0]
    kind = failure_kind(error, handshake)
    if not handshake.spoke:
        if isinstance(error, ConnectionAbortedError):  # the loop's handshake timeout
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
    if isinstance(error, ConnectionAbortedError):
        return "timeout"
    if isinstance(error, ConnectionResetError):
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
    if isinstance(error, ConnectionAbortedError):
        return f"the handshake took longer than {limits.handshake_timeout:g}s (handshake_timeout)"
    if isinstance(error, ConnectionResetError):
        return "the caller closed the connection during the handshake"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
