"""Explain, in words, why an egress route's mTLS connection to its remote failed.

grpc core reports a failed handshake as jargon ("Hostname Verification Check
failed", "CERTIFICATE_VERIFY_FAILED") or, when the remote refuses our client
certificate, as a bare "Socket closed". When an egress call fails that way, one
diagnostic handshake (on a thread, with Python's ssl, at most one per few
seconds) looks at what the remote presents and whether it accepts this route's
certificate, and the local caller gets a sentence naming the cause and the
setting to fix. The relay's calls never wait on this unless they already failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509

from sidecar.addresses import Address
from sidecar.tls import TLSMaterial
from sidecar.verify import name_matches, san_names

logger = logging.getLogger("sidecar.egress")

# Core details that can hide a TLS failure; connection refused or a DNS failure
# is already plain and needs no handshake to explain.
_TLS_HINTS = (
    "Tls handshake",
    "Hostname Verification",
    "CERTIFICATE_VERIFY",
    "Socket closed",
    "SSL",
)
_CACHE_SECONDS = 5.0
_TIMEOUT_SECONDS = 3.0
# An HTTP/2 client preface and an empty SETTINGS frame: a remote that accepted
# our certificate answers with its SETTINGS; one that refused it sends an alert.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class _Observed:
    """What one diagnostic handshake saw."""

    leaf: x509.Certificate | None = None
    refused_ours: str | None = None  # the alert the remote answered our certificate with


class TLSDiagnosis:
    """Turns an egress route's connection failure into a reason a person can act on."""

    def __init__(
        self,
        address: Address,
        server_name: str,
        material: TLSMaterial,
        *,
        server_name_setting: str,
        ca_setting: str,
        cert_setting: str,
    ) -> None:
        self._address = address
        self._server_name = server_name
        self._material = material
        self._settings = (server_name_setting, ca_setting, cert_setting)
        self._cached: tuple[float, str, str | None] | None = None  # (when, details, reason)
        self._lock = asyncio.Lock()

    async def explain(self, details: str) -> str | None:
        """A plain reason for a failure core described as details, or None if it is not TLS."""
        if not any(hint in details for hint in _TLS_HINTS):
            return None
        async with self._lock:  # concurrent failing calls share one handshake
            cached = self._cached
            if cached and cached[1] == details and time.monotonic() - cached[0] < _CACHE_SECONDS:
                return cached[2]
            observed = await asyncio.to_thread(self._handshake)
            reason = self._reason(details, observed)
            if reason is not None and (cached is None or cached[2] != reason):
                logger.warning("remote %s: %s", self._address, reason)
            self._cached = (time.monotonic(), details, reason)
            return reason

    def _reason(self, details: str, observed: _Observed | None) -> str | None:
        server_name_setting, ca_setting, cert_setting = self._settings
        leaf = observed.leaf if observed else None
        presented = _describe(leaf) if leaf is not None else "its certificate"
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
        if observed is not None and observed.refused_ours is not None:
            ours = self._material.leaf
            return (
                f"the remote refused this route's client certificate "
                f"{ours.subject.rfc4514_string()} (issued by {ours.issuer.rfc4514_string()}) "
                f"from {cert_setting}: {observed.refused_ours}"
            )
        return None

    def _handshake(self) -> _Observed | None:
        """Connect as the relay does, without verifying, and note what the remote says."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # we only look; trust is decided by core
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
        with _pem_files(self._material) as (cert_path, key_path):
            if cert_path is not None and key_path is not None:
                context.load_cert_chain(cert_path, key_path)
        host, port = self._address.host, self._address.port
        try:
            with socket.create_connection((host, port), timeout=_TIMEOUT_SECONDS) as raw:
                sni = None if _is_ip(self._server_name) else self._server_name
                with context.wrap_socket(raw, server_hostname=sni) as tls:
                    der = tls.getpeercert(binary_form=True)
                    leaf = x509.load_der_x509_certificate(der) if der else None
                    return _Observed(leaf, _refusal(tls))
        except ssl.SSLError as exc:  # TLS 1.2: the remote refuses during the handshake
            return _Observed(None, _alert(exc))
        except OSError:
            return None


def _refusal(tls: ssl.SSLSocket) -> str | None:
    """TLS 1.3 sends the verdict on our certificate after the handshake: read it."""
    try:
        tls.sendall(_H2_PREFACE)
        return None if tls.recv(64) else "it closed the connection"
    except ssl.SSLError as exc:
        return _alert(exc)
    except OSError:
        return "it closed the connection"


def _alert(exc: ssl.SSLError) -> str:
    reason = (exc.reason or str(exc)).lower()
    for prefix in ("tlsv13_alert_", "tlsv1_alert_", "sslv3_alert_"):
        if reason.startswith(prefix):
            return f"TLS alert {reason.removeprefix(prefix).replace('_', ' ')}"
    return reason.replace("_", " ")


def _describe(leaf: x509.Certificate) -> str:
    names = ", ".join(san_names(leaf)) or "no SAN"
    return f"{leaf.subject.rfc4514_string()} [{names}] issued by {leaf.issuer.rfc4514_string()}"


def _is_ip(name: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _pem_files(material: TLSMaterial) -> Iterator[tuple[str | None, str | None]]:
    """Our chain and key as paths for ssl, which reads only files; in memory, never on disk."""
    if not hasattr(os, "memfd_create"):
        yield None, None  # elsewhere than Linux: look without presenting a certificate
        return
    fds = [os.memfd_create("sidecar-diagnosis") for _ in range(2)]
    try:
        for fd, data in zip(fds, (material.cert_chain_pem, material.key_pem), strict=True):
            os.write(fd, data)
        yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
    finally:
        for fd in fds:
            os.close(fd)
