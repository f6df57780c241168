"""`sidecar dial`: connect to a gRPC server as a client would, and say what fails and the fix.

    sidecar dial localhost:8443 --cert alice.pem --key alice.key --ca ca.pem
    sidecar dial 10.0.0.7:8443 ... --server-name app.internal --method /kv.KV/Get
    sidecar dial localhost:50051 --plaintext          # the app behind the sidecar

Each step is one line: the TCP connection; the TLS handshake (version, ALPN); the
server's certificate (subject, names, issuer, expiry); whether it chains to --ca and
carries the name dialled; whether the server accepted our certificate; one gRPC call
(grpc.health.v1.Health/Check by default, or --method with an empty message) and its
status. The first step that fails is followed by the fix, in one line. The handshakes
are the egress diagnosis's (pki/diagnosis.py): one that only looks, one that verifies.

Exit 0 when the call succeeded (the default health call also when the app has no health
service: the call reached it), 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import math
import re
import socket
import ssl
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2

from sidecar.config.addresses import Address, parse_address
from sidecar.config.pem import read_bytes
from sidecar.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, ConfigError
from sidecar.h2.frames import PREFACE, SETTINGS, frame
from sidecar.observe.logs import escape
from sidecar.pki.diagnosis import Observed, describe, looking_context, observe, sni
from sidecar.pki.tls import TLSMaterial, load_own_chain
from sidecar.pki.x509 import (
    name_matches,
    parse_certificates,
    parse_private_key,
    pem_bundle,
    public_key_matches,
    san_names,
)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_FRAME_HEADER = 9
_MAX_TIMEOUT = 3600
# OpenSSL's verify codes (X509_V_ERR_*) that have a fix of their own.
_EXPIRED = 10
_WRONG_PURPOSE = 26
_SELF_SIGNED = (18, 19)
# A name worth suggesting to dial (from the server's certificate, which it chooses): a host
# name or an address, no wildcard, nothing a shell would read otherwise.
_DIALLABLE = re.compile(r"[A-Za-z0-9.:-]+")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"sidecar dial: usage error: {message} (see sidecar dial --help)", file=sys.stderr)
        self.exit(EXIT_USAGE)


@dataclass
class Step:
    step: str
    ok: bool
    detail: str


@dataclass
class Report:
    """The steps so far and, once one failed, the fix."""

    target: str
    server_name: str
    steps: list[Step] = field(default_factory=list)
    fix: str | None = None

    def passed(self, step: str, detail: str) -> None:
        self.steps.append(Step(step, True, detail))

    def failed(self, step: str, detail: str, fix: str) -> None:
        self.steps.append(Step(step, False, detail))
        if self.fix is None:
            self.fix = fix

    @property
    def ok(self) -> bool:
        return self.fix is None

    def text(self) -> str:
        lines = [f"sidecar dial {self.target} (server name {self.server_name})"]
        lines += [f"  {'ok' if s.ok else 'FAIL':5} {s.step:12} {s.detail}" for s in self.steps]
        lines.append("OK" if self.ok else f"fix: {self.fix}")
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok})


@dataclass(frozen=True)
class _Client:
    """What the user gave to dial with."""

    address: Address
    server_name: str
    timeout: float
    method: str
    cert_path: str | None = None
    ca_path: str | None = None
    bundle: tuple[x509.Certificate, ...] = ()  # --ca's certificates
    material: TLSMaterial | None = None  # our chain and key, to present

    @property
    def ours(self) -> x509.Certificate | None:
        """Our leaf certificate, if we present one."""
        return None if self.material is None else self.material.leaf

    def present_ours(self, context: ssl.SSLContext) -> None:
        if self.material is not None:
            load_own_chain(context, self.material)


def main(argv: Sequence[str]) -> int:
    parser = _Parser(
        prog="sidecar dial",
        description="Connect to a gRPC server as a client would and report each step: TCP, "
        "TLS, the server's certificate, whether it accepts ours, one call. A failure ends "
        "with its fix. Exit 0 when the call succeeded, else 1.",
    )
    parser.add_argument("target", metavar="HOST:PORT")
    parser.add_argument("--cert", metavar="FILE", help="our client certificate (PEM)")
    parser.add_argument("--key", metavar="FILE", help="its private key (PEM)")
    parser.add_argument("--ca", metavar="FILE", help="the CA bundle the server's certificate "
                        "must chain to (PEM)")  # fmt: skip
    parser.add_argument("--server-name", metavar="NAME", help="the name the server's "
                        "certificate must carry (default: HOST)")  # fmt: skip
    parser.add_argument("--method", default=HEALTH_CHECK, metavar="/PKG.SERVICE/METHOD",
                        help="the call to make, with an empty message (default "
                        f"{HEALTH_CHECK})")  # fmt: skip
    parser.add_argument("--plaintext", action="store_true", help="no TLS: a plain gRPC server, "
                        "such as the app behind the sidecar")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="for each step (default 5)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = parser.parse_args(argv)
    try:
        client = _client(args)
    except ConfigError as error:
        print(f"sidecar dial: {error}", file=sys.stderr)
        return EXIT_USAGE
    report = Report(str(client.address), client.server_name)
    if _tcp(client, report):
        reached = _speaks_http2(client, report) if args.plaintext else _tls(client, report)
        if reached:
            _call(client, report, plaintext=args.plaintext)
    print(report.json() if args.json else report.text())
    return EXIT_OK if report.ok else EXIT_RUNTIME


def _client(args: argparse.Namespace) -> _Client:
    address = parse_address(args.target, "HOST:PORT")
    if not args.method.startswith("/") or args.method.count("/") != 2:
        raise ConfigError(f"--method: expected /package.Service/Method, got {args.method!r}")
    if not math.isfinite(args.timeout) or not 0 < args.timeout <= _MAX_TIMEOUT:
        raise ConfigError(f"--timeout: must be a number of seconds above 0 and at most "
                          f"{_MAX_TIMEOUT}, got {args.timeout:g}")  # fmt: skip
    for name, flag in ((address.host, "HOST:PORT"), (args.server_name, "--server-name")):
        _check_name(name, flag)
    common = {
        "address": address, "server_name": args.server_name or address.host,
        "timeout": args.timeout, "method": args.method,
    }  # fmt: skip
    if args.plaintext:
        given = [flag for flag in ("cert", "key", "ca", "server_name") if getattr(args, flag)]
        if given:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise ConfigError(f"--plaintext: {flags} mean TLS; leave them out")
        return _Client(**common)
    if not args.ca:
        raise ConfigError("--ca: give the CA bundle the server's certificate must chain to "
                          "(or --plaintext for a server without TLS)")  # fmt: skip
    if bool(args.cert) != bool(args.key):
        raise ConfigError("--cert and --key go together")
    files = {name: _read(getattr(args, name), f"--{name}") for name in ("ca", "cert", "key")}
    ca, cert, key = files["ca"], files["cert"], files["key"]
    assert ca is not None
    bundle = tuple(parse_certificates(ca, f"--ca {args.ca}"))
    material = None
    if cert is not None and key is not None:  # (given together: checked above)
        ours = parse_certificates(cert, f"--cert {args.cert}")[0]
        if not public_key_matches(ours, parse_private_key(key, f"--key {args.key}")):
            raise ConfigError(f"--key {args.key} is not the key of --cert {args.cert}")
        material = TLSMaterial(cert_chain_pem=cert, key_pem=key, ca_pem=ca, leaf=ours)
    return _Client(**common, cert_path=args.cert, ca_path=args.ca, bundle=bundle, material=material)


def _check_name(name: str | None, flag: str) -> None:
    """A name the resolver and TLS (SNI) can take: IDNA-encodable, or an address."""
    if not name:
        return
    try:
        ipaddress.ip_address(name)
        return
    except ValueError:
        pass
    try:
        name.encode("idna")
    except UnicodeError:
        raise ConfigError(f"{flag}: {escape(name)!s} is not a valid host name") from None


def _read(path: str | None, flag: str) -> bytes | None:
    return None if path is None else read_bytes(Path(path), flag)


def _tcp(client: _Client, report: Report) -> bool:
    address = client.address
    try:
        with socket.create_connection((address.host, address.port), timeout=client.timeout) as sock:
            peer = sock.getpeername()
    except socket.gaierror as error:
        report.failed("tcp", f"{address.host} does not resolve ({error.strerror})",
                      f"check the host name {address.host!r}")  # fmt: skip
        return False
    except ConnectionRefusedError:
        report.failed("tcp", f"connection refused: nothing listens on {address}",
                      "start the sidecar (or the server), or dial the port it listens "
                      "on")  # fmt: skip
        return False
    except TimeoutError:
        report.failed("tcp", f"no answer within {client.timeout:g}s",
                      "check the address: a firewall, or a host that is down, drops the "
                      "connection")  # fmt: skip
        return False
    except OSError as error:
        report.failed("tcp", f"cannot connect: {error.strerror or error}",
                      "check the address and the network")  # fmt: skip
        return False
    shown = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
    report.passed("tcp", f"connected to {shown}:{peer[1]}")
    return True


def _speaks_http2(client: _Client, report: Report) -> bool:
    """A plaintext server must answer an HTTP/2 preface with its SETTINGS."""
    address = client.address
    try:
        with socket.create_connection((address.host, address.port), timeout=client.timeout) as sock:
            sock.sendall(PREFACE + frame(SETTINGS, 0, 0, b""))
            answer = sock.recv(_FRAME_HEADER)
    except TimeoutError:
        answer, reason = b"", f"no answer within {client.timeout:g}s"
    except OSError as error:
        answer, reason = b"", f"it closed the connection ({error.strerror or error})"
    else:
        reason = "it closed the connection"
    if len(answer) >= 4 and answer[3] == SETTINGS:
        report.passed("http2", "speaks HTTP/2 without TLS")
        return True
    if answer[:1] == b"\x15":  # a TLS alert: the server wanted a ClientHello
        report.failed("http2", "the server answered with a TLS alert: it expects TLS",
                      "drop --plaintext and pass --cert, --key and --ca")  # fmt: skip
        return False
    if reason.startswith("no answer"):
        report.failed("http2", f"no HTTP/2 answer: {reason}",
                      "the port takes connections but says nothing: dial a gRPC "
                      "server's port")  # fmt: skip
        return False
    if not answer:  # the sidecar, like most TLS servers, closes on bytes that are not TLS
        report.failed("http2", f"no HTTP/2 answer: {reason}",
                      "a TLS port closes on a plaintext preface: drop --plaintext and pass "
                      "--cert, --key and --ca (or dial the plaintext server's port)")  # fmt: skip
        return False
    report.failed("http2", f"no HTTP/2 answer: it answered {escape(repr(answer[:16]))}",
                  "dial a gRPC server's port (a plaintext gRPC server answers an HTTP/2 "
                  "preface with its SETTINGS)")  # fmt: skip
    return False


def _tls(client: _Client, report: Report) -> bool:
    """The looking handshake, then the verifying one; True when the call may go ahead."""
    context = looking_context()
    try:
        client.present_ours(context)
    except ssl.SSLError as error:
        report.failed("client", f"OpenSSL refuses our certificate or key: {error.reason}",
                      f"see sidecar certs inspect {client.cert_path}")  # fmt: skip
        return False
    address = client.address
    try:
        seen = observe(address.host, address.port, client.server_name, context, client.timeout)
        if seen is None:
            report.failed("tls", f"no handshake: the connection closed, or no answer within "
                          f"{client.timeout:g}s", "dial the sidecar's TLS port")  # fmt: skip
            return False
        if seen.leaf is None:
            return _no_handshake(seen, client, report)
        if seen.alpn == "h2":
            report.passed("tls", f"{seen.version}, ALPN h2")
        else:
            report.failed("tls", f"{seen.version}, no ALPN h2: the server does not offer "
                          "HTTP/2", "dial a gRPC server (gRPC over TLS negotiates h2)")  # fmt: skip
        _certificate(seen.leaf, report)
        _trust(client, seen.leaf, report)
        _name(client, seen.leaf, report)
        _accepted(client, seen, report)
    except Exception as error:  # the certificate is the server's to make: it may be anything
        report.failed("certificate", f"the server's certificate cannot be read: "
                      f"{escape(str(error))}", "the server presents a malformed certificate: "
                      "reissue it")  # fmt: skip
    return report.ok


def _no_handshake(seen: Observed, client: _Client, report: Report) -> bool:
    failure = seen.failure or seen.refused_ours or "no certificate"
    if "wrong version number" in failure or "record layer failure" in failure:
        report.failed("tls", "the server does not speak TLS",
                      f"{client.address} looks like a plaintext port: check it with "
                      "--plaintext, or dial the sidecar's port")  # fmt: skip
    elif seen.refused_ours is not None:  # TLS 1.2: refused during the handshake
        _accepted(client, seen, report)
    else:
        report.failed("tls", f"the handshake failed: {failure}",
                      "the server refuses this TLS client; its log says why")  # fmt: skip
    return False


def _certificate(leaf: x509.Certificate, report: Report) -> None:
    until = leaf.not_valid_after_utc
    since = leaf.not_valid_before_utc
    now = datetime.datetime.now(datetime.timezone.utc)
    shown = f"{describe(leaf)}, valid until {until:%Y-%m-%d %H:%M} UTC"
    if now > until:
        report.failed("certificate", f"{shown}: expired",
                      "the server's certificate has expired: renew it")  # fmt: skip
    elif now < since:
        report.failed("certificate", f"{shown}: not valid before {since:%Y-%m-%d %H:%M} UTC",
                      "the server's certificate is not valid yet: check its clock or reissue "
                      "it")  # fmt: skip
    else:
        report.passed("certificate", f"{shown} ({(until - now).days} days left)")


def _trust(client: _Client, leaf: x509.Certificate, report: Report) -> None:
    """A handshake that verifies the server's chain against --ca, as the gRPC client will."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the name is its own step
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=pem_bundle(client.bundle).decode("ascii"))
    context.set_alpn_protocols(["h2"])
    client.present_ours(context)  # (else the server would log a failed handshake)
    address = client.address
    try:
        with (
            socket.create_connection((address.host, address.port), client.timeout) as raw,
            context.wrap_socket(raw, server_hostname=sni(client.server_name)),
        ):
            pass
    except ssl.SSLCertVerificationError as error:
        report.failed("trust", f"does not chain to --ca: {error.verify_message}",
                      _untrusted(client, leaf, error.verify_code))  # fmt: skip
        return
    except OSError as error:
        report.failed("trust", f"could not be checked: {error}",
                      "the server ended the handshake that verifies its certificate; "
                      "its log says why")  # fmt: skip
        return
    report.passed("trust", f"chains to --ca ({client.ca_path})")


def _untrusted(client: _Client, leaf: x509.Certificate, code: int) -> str:
    """The fix for a server certificate OpenSSL does not verify, by its verify code."""
    if code == _EXPIRED:
        return "the server's certificate (or one of its chain) has expired: renew it"
    if code == _WRONG_PURPOSE:
        return ("the server's certificate is not for servers (no serverAuth usage): reissue "
                "it (sidecar certs issue --server)")  # fmt: skip
    if code in _SELF_SIGNED:
        return "the server's certificate is self-signed: pass it as --ca, or reissue it from a CA"
    bundle = escape(", ".join(cert.subject.rfc4514_string() for cert in client.bundle))
    issuer = escape(leaf.issuer.rfc4514_string())
    return (f"the server's certificate was issued by {issuer}; --ca ({client.ca_path}) holds "
            f"[{bundle}]: pass the CA that issued it (or have the server send its "
            "intermediates)")  # fmt: skip


def _name(client: _Client, leaf: x509.Certificate, report: Report) -> None:
    names = san_names(leaf)
    if name_matches(leaf, client.server_name):
        report.passed("name", f"carries {client.server_name}")
        return
    dns = [name.removeprefix("DNS:") for name in names if name.startswith(("DNS:", "IP:"))]
    if not dns:
        report.failed("name", f"carries no DNS or IP name, not {client.server_name}",
                      "reissue the server's certificate with the names clients dial "
                      "(sidecar certs issue --dns ...)")  # fmt: skip
        return
    carried = escape(", ".join(names))
    diallable = [name.removeprefix("IP:") for name in dns if _DIALLABLE.fullmatch(name)]
    instead = (
        f"dial {diallable[0]}, or pass --server-name {diallable[0]}"
        if diallable
        else "pass --server-name with a name it carries"
    )
    report.failed("name", f"the certificate names {carried}, not {client.server_name}",
                  f"{instead} (or reissue the certificate with --dns "
                  f"{client.server_name})")  # fmt: skip


def _accepted(client: _Client, seen: Observed, report: Report) -> None:
    if seen.refused_ours is None and seen.failure is None:
        ours = _ours(client)
        report.passed("client", f"the server accepted our certificate {ours}" if ours else
                      "the server accepted us without a client certificate")  # fmt: skip
        return
    if seen.refused_ours is None:
        report.failed("client", f"after the handshake: {seen.failure}",
                      "the server ended the connection; its log says why")  # fmt: skip
        return
    if client.ours is None:
        report.failed("client", f"the server refused us: {seen.refused_ours}",
                      "the server requires a client certificate: pass --cert and "
                      "--key")  # fmt: skip
        return
    assert client.ours is not None
    issuer = escape(client.ours.issuer.rfc4514_string())
    report.failed("client", f"the server refused our certificate {_ours(client)}: "
                  f"{seen.refused_ours}",
                  f"the server must trust {issuer}, which issued ours (its --ca); or our "
                  "certificate has expired or lacks clientAuth: see sidecar certs inspect "
                  f"{client.cert_path}")  # fmt: skip


def _ours(client: _Client) -> str:
    leaf = client.ours
    if leaf is None:
        return ""
    names = ", ".join([leaf.subject.rfc4514_string(), *san_names(leaf)])
    return escape(names)


def _call(client: _Client, report: Report, *, plaintext: bool) -> None:
    target = client.address.target
    # Straight to the target, as the steps before went: not through an http(s)_proxy.
    options: list[tuple[str, str | int]] = [("grpc.enable_http_proxy", 0)]
    if plaintext:
        channel = grpc.insecure_channel(target, options=options)
    else:
        material = client.material
        credentials = grpc.ssl_channel_credentials(
            pem_bundle(client.bundle),
            None if material is None else material.key_pem,
            None if material is None else material.cert_chain_pem,
        )
        options.append(("grpc.ssl_target_name_override", client.server_name))
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        try:
            answer = channel.unary_unary(client.method)(b"", timeout=client.timeout)
        except grpc.RpcError as error:
            _call_failed(client, report, error)
            return
    if client.method != HEALTH_CHECK:
        report.passed("call", f"{client.method}: OK")
        return
    try:
        status = health_pb2.HealthCheckResponse.FromString(answer).status
    except DecodeError:
        report.failed("call", f"{client.method}: OK, but the answer is not a health status",
                      "the server's health service answers malformed messages")  # fmt: skip
        return
    serving = health_pb2.HealthCheckResponse.ServingStatus
    name = serving.Name(status) if status in serving.values() else f"status {status}"
    if status == health_pb2.HealthCheckResponse.SERVING:
        report.passed("call", f"{client.method}: OK ({name})")
    else:
        report.failed("call", f"{client.method}: OK, but {name}",
                      "the server reports it is not serving: check the app")  # fmt: skip


def _call_failed(client: _Client, report: Report, error: grpc.RpcError) -> None:
    code: grpc.StatusCode = error.code()
    details = escape(str(error.details() or ""))
    said = f"{client.method}: {code.name}: {details}"
    if details.startswith("Received http2 header with status"):  # an HTTP server, not gRPC
        report.failed("call", said, "an HTTP/2 server answered, not a gRPC server: dial the "
                      "gRPC server's port")  # fmt: skip
    elif code == grpc.StatusCode.UNIMPLEMENTED and client.method == HEALTH_CHECK:
        report.passed("call", f"{said} (the call reached a server without a health service; "
                      "pass --method to call one of its own)")  # fmt: skip
    elif code == grpc.StatusCode.PERMISSION_DENIED and "is not allowed to call" in details:
        report.failed("call", said, f"the route does not allow our certificate ({_ours(client)}):"
                      " allow one of its names there (e.g. --allow-cn), or dial with a "
                      "certificate it allows")  # fmt: skip
    elif code == grpc.StatusCode.UNAVAILABLE and "upstream" in details:
        report.failed("call", said, "the sidecar is up but the app behind it is not: start the "
                      "app, or fix the sidecar's --upstream")  # fmt: skip
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        report.failed("call", said, f"no answer within {client.timeout:g}s: the server is slow "
                      "or stuck (raise --timeout to wait longer)")  # fmt: skip
    elif code == grpc.StatusCode.UNAVAILABLE:
        report.failed("call", said, "the call did not reach a server: see the steps above and "
                      "the sidecar's log")  # fmt: skip
    else:
        report.failed("call", said, f"the server answered {code.name}: the connection works; "
                      "the answer is the app's (or pass another --method)")  # fmt: skip
