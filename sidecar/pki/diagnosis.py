"""Explain, in words, why an mTLS connection to a server failed: an egress route's to its remote.

grpc core reports a failed handshake as jargon ("Hostname Verification Check
failed", "CERTIFICATE_VERIFY_FAILED") or, when the remote refuses our client
certificate, as a bare "Socket closed". When an egress call fails that way, one
diagnostic handshake (on a thread, with Python's ssl, at most one per few
seconds) looks at what the remote presents and whether it accepts this route's
certificate, and the local caller gets a sentence naming the cause and the
setting to fix. Only calls that already failed wait for it, and for at most a second.
`observe` (the handshake that looks) serves `sidecar dial` too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from sidecar.config.addresses import Address
from sidecar.h2.frames import PREFACE, SETTINGS, frame
from sidecar.observe.logs import escape
from sidecar.pki.tls import TLSMaterial, load_own_chain
from sidecar.pki.x509 import name_matches, san_names

logger = logging.getLogger("sidecar.egress")

# Core details that can hide a TLS failure; connection refused or a DNS failure
# is already plain and needs no handshake to explain.
_TLS_HINTS = (
    "Tls handshake",
    "Hostname Verification",
    "CERTIFICATE_VERIFY",
    "Socket closed",
    "SSL",
    # A TLS 1.3 remote that refuses our certificate sends its alert after the
    # handshake; core then fails to unwrap it ("Unwrap failed (TSI_DATA_CORRUPTED)").
    "TSI_",
    # The spliced data plane's words for a remote that closed right after the handshake.
    "TLS handshake",
)
_CACHE_SECONDS = 5.0
_TIMEOUT_SECONDS = 3.0  # connect and handshake
_WAIT_SECONDS = 1.0  # how long a failed call waits for the diagnosis
# Alerts by which a server says it refuses the client's certificate (RFC 8446 6.2).
_CERTIFICATE_ALERTS = frozenset(
    (
        "bad_certificate",
        "unsupported_certificate",
        "certificate_revoked",
        "certificate_expired",
        "certificate_unknown",
        "unknown_ca",
        "access_denied",
        "certificate_required",
    )
)
# An HTTP/2 client preface and an empty SETTINGS frame: a remote that accepted
# our certificate answers with its SETTINGS; one that refused it sends an alert.
_H2_PREFACE = PREFACE + frame(SETTINGS, 0, 0, b"")


@dataclass(frozen=True)
class Observed:
    """What one diagnostic handshake saw."""

    leaf: x509.Certificate | None = None
    refused_ours: str | None = None  # how the remote answered our certificate, if it refused it
    failure: str | None = None  # any other reason the handshake failed
    version: str | None = None  # the TLS version, once the handshake finished
    alpn: str | None = None  # the protocol the server chose (h2 for gRPC)


class TLSDiagnosis:
    """Turns an egress route's connection failure into a reason a person can act on."""

    def __init__(
        self,
        address: Address,
        server_name: str,
        material: Callable[[], TLSMaterial],
        *,
        server_name_setting: str,
        ca_setting: str,
        cert_setting: str,
    ) -> None:
        self._address = address
        self._server_name = server_name
        self._material = material  # the route's current material (it changes on a reload)
        self._settings = (server_name_setting, ca_setting, cert_setting)
        self._cached: tuple[float, str | None] | None = None  # (when, reason)
        self._running: asyncio.Future[str | None] | None = None

    async def explain(self, details: str) -> str | None:
        """A plain reason for a failure core described as details, or None if there is none.

        The reason found is kept for a few seconds whatever core's text: with a
        name that resolves to several addresses, core's "last error" alternates
        between them (a TLS failure on one, connection refused on another).
        """
        cached = self._cached
        if cached is not None and time.monotonic() - cached[0] < _CACHE_SECONDS:
            return cached[1]
        if not any(hint in details for hint in _TLS_HINTS):
            return None
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._diagnose(details))  # one at a time
        try:
            # The call has failed already; hold its answer back only briefly. A slow
            # remote finishes the diagnosis in the background, for the next calls.
            return await asyncio.wait_for(asyncio.shield(self._running), _WAIT_SECONDS)
        except asyncio.TimeoutError:
            return None

    async def _diagnose(self, details: str) -> str | None:
        try:
            observed = await asyncio.to_thread(self._handshake)
            reason = self._reason(details, observed)
        except Exception:  # a remote can present anything; never fail the call over it
            logger.debug("could not diagnose the handshake with %s", self._address, exc_info=True)
            reason = None
        previous = self._cached[1] if self._cached else None
        if reason is not None and reason != previous:
            logger.warning("remote %s: %s", self._address, reason)
        self._cached = (time.monotonic(), reason)
        return reason

    def _reason(self, details: str, observed: Observed | None) -> str | None:
        server_name_setting, ca_setting, cert_setting = self._settings
        leaf = observed.leaf if observed else None
        presented = describe(leaf) if leaf is not None else "its certificate"
        if "Hostname Verification" in details or (
            leaf is not None and not name_matches(leaf, self._server_name)
        ):
            return (
                f"the remote's certificate does not match server name {self._server_name!r}: "
                f"it presented {presented}; set {server_name_setting} to a name it carries"
            )
        if "CERTIFICATE_VERIFY_FAILED" in details:
            cause = details.rsplit("CERTIFICATE_VERIFY_FAILED: ", 1)[-1].removesuffix(": OK")
            return (
                f"the remote's certificate is not trusted by {ca_setting} ({cause}): it "
                f"presented {presented}"
            )
        if observed is None:
            return None
        if observed.refused_ours is not None:
            ours = self._material().leaf
            return (
                f"the remote refused this route's client certificate "
                f"{ours.subject.rfc4514_string()} (issued by {ours.issuer.rfc4514_string()}) "
                f"from {cert_setting}: {observed.refused_ours}"
            )
        if observed.failure in ("wrong version number", "record layer failure"):
            return f"the remote does not speak TLS (is {self._address} a plaintext port?)"
        if observed.failure is not None:
            return f"the TLS handshake with the remote failed: {observed.failure}"
        return None

    def _handshake(self) -> Observed | None:
        """Connect as the relay does, without verifying, and note what the remote says."""
        context = looking_context()
        load_own_chain(context, self._material())
        return observe(self._address.host, self._address.port, self._server_name, context)


def looking_context() -> ssl.SSLContext:
    """A client context that completes a handshake with any server, to look at what it shows
    (trust is decided elsewhere): TLS 1.2 or later, ALPN h2, no own certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


def observe(
    host: str, port: int, server_name: str, context: ssl.SSLContext,
    timeout: float = _TIMEOUT_SECONDS,
) -> Observed | None:  # fmt: skip
    """One handshake with context (see looking_context), then the server's verdict on our
    certificate; None when there was no connection to make one on."""
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=sni(server_name)) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            leaf = x509.load_der_x509_certificate(der) if der else None
            return _after_handshake(tls, leaf, timeout)
    except ssl.SSLError as exc:  # TLS 1.2: the remote refuses during the handshake
        return _classify(exc, None, None, None)
    except OSError:
        return None


def _after_handshake(tls: ssl.SSLSocket, leaf: x509.Certificate | None, timeout: float) -> Observed:
    """Send an HTTP/2 preface and read the answer: the remote's verdict on our certificate.

    Under TLS 1.3 the server judges the client's certificate after the client has
    finished its handshake, so the verdict (an alert, or a close) only comes now.
    """
    version = tls.version()  # before the remote may close the connection
    alpn = tls.selected_alpn_protocol()
    send_error: ssl.SSLError | None = None
    try:
        tls.sendall(_H2_PREFACE)
    except ssl.SSLError as exc:  # the remote may have refused us already; read its alert
        send_error = exc
    except OSError:
        pass
    try:
        if tls.recv(64):
            # The remote answered as HTTP/2: it took our certificate.
            return Observed(leaf, version=version, alpn=alpn)
    except ssl.SSLError as exc:
        return _classify(exc, leaf, version, alpn)
    except TimeoutError:
        return Observed(
            leaf, failure=f"no answer within {timeout:g}s after the handshake",
            version=version, alpn=alpn,
        )  # fmt: skip
    except OSError:
        pass
    if version == "TLSv1.3":
        # A grpc server that refuses a client certificate closes without an alert.
        return Observed(
            leaf, refused_ours="it closed the connection after our certificate",
            version=version, alpn=alpn,
        )  # fmt: skip
    # Under TLS 1.2 a finished handshake means the remote accepted our certificate.
    if send_error is not None:
        return _classify(send_error, leaf, version, alpn)
    return Observed(
        leaf, failure="the remote closed the connection after the handshake",
        version=version, alpn=alpn,
    )  # fmt: skip


def _classify(
    exc: ssl.SSLError, leaf: x509.Certificate | None, version: str | None, alpn: str | None
) -> Observed:
    reason = (exc.reason or str(exc)).lower()
    for prefix in ("tlsv13_alert_", "tlsv1_alert_", "sslv3_alert_"):
        if reason.startswith(prefix):
            alert = reason.removeprefix(prefix).replace("_", " ")
            if reason.removeprefix(prefix) in _CERTIFICATE_ALERTS:
                return Observed(leaf, refused_ours=f"TLS alert {alert}", version=version, alpn=alpn)
            return Observed(leaf, failure=f"TLS alert {alert}", version=version, alpn=alpn)
    return Observed(leaf, failure=reason.replace("_", " "), version=version, alpn=alpn)


def describe(leaf: x509.Certificate) -> str:
    """The remote's certificate in a few words, escaped (its names are the remote's to
    choose: a look-alike letter must not pass for another in a log line)."""
    names = ", ".join(san_names(leaf)) or "no SAN"
    subject, issuer = leaf.subject.rfc4514_string(), leaf.issuer.rfc4514_string()
    return escape(f"{subject} [{names}] issued by {issuer}")


def sni(server_name: str) -> str | None:
    """The SNI a client sends for server_name: none for an IP address (RFC 6066 3)."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in server_name else socket.AF_INET, server_name)
    except OSError:
        return server_name
    return None
