"""The command line: parse flags into a Config, run the sidecar, map failures to exit codes.

Exit codes: 0 after a clean drain; 2 for a usage or configuration error (one
line naming the flag or file, no traceback); 1 for a runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from sidecar import __version__
from sidecar.addresses import parse_address
from sidecar.config import LOG_LEVELS, Config
from sidecar.errors import EXIT_RUNTIME, EXIT_USAGE, ConfigError, StartupError
from sidecar.policy import AllowRules

_DESCRIPTION = """\
Put mutual TLS and a caller allowlist in front of a plain gRPC service, with no
change to the service. Every call is relayed as raw bytes: all four call types,
metadata, headers, trailers, status details, deadlines and cancellation.

  sidecar --upstream localhost:50051 --cert server.pem --key server.key \\
          --ca ca.pem --allow-cn alice --allow-cn bob
"""

_EPILOG = """\
patterns: --allow-* take exact names or globs; '*' matches within one label
(no '.' in CN/DNS, no '/' in URIs), '**' matches across labels, e.g.
--allow-dns '*.prod.example.com', --allow-uri 'spiffe://example.org/ns/prod/**'.
exit codes: 0 clean stop, 1 runtime failure, 2 usage or configuration error.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, naming the flag, instead of argparse's usage block.
        self.exit(EXIT_USAGE, f"sidecar: usage error: {message} (see sidecar --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sidecar",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    parser.add_argument(
        "--mode",
        choices=["ingress"],
        default="ingress",
        help="ingress: terminate mTLS from callers and relay to a local plaintext upstream "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--upstream",
        required=True,
        metavar="HOST:PORT",
        help="the plain gRPC service to protect, e.g. localhost:50051 or unix:/run/app.sock; "
        "must be on loopback unless --unsafe-upstream",
    )
    parser.add_argument(
        "--listen",
        default="0.0.0.0:8443",
        metavar="HOST:PORT",
        help="where callers connect with mTLS; port 0 picks a free port (default: %(default)s)",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument(
        "--cert", required=True, metavar="FILE", help="server certificate chain, PEM (leaf first)"
    )
    tls.add_argument(
        "--key", required=True, metavar="FILE", help="private key of --cert, PEM, unencrypted"
    )
    tls.add_argument(
        "--ca",
        required=True,
        metavar="FILE",
        help="CA bundle, PEM: callers must present a certificate that chains to it",
    )
    allow = parser.add_argument_group(
        "allowlist (checked on every call; a caller matching no rule gets PERMISSION_DENIED)"
    )
    allow.add_argument(
        "--allow-cn",
        action="append",
        default=[],
        metavar="PATTERN",
        help="allow callers whose certificate subject CN matches (repeatable)",
    )
    allow.add_argument(
        "--allow-dns",
        action="append",
        default=[],
        metavar="PATTERN",
        help="allow callers with a matching DNS SAN (repeatable, case-insensitive)",
    )
    allow.add_argument(
        "--allow-uri",
        action="append",
        default=[],
        metavar="PATTERN",
        help="allow callers with a matching URI SAN, SPIFFE IDs included (repeatable)",
    )
    allow.add_argument(
        "--allow-all",
        action="store_true",
        help="accept any caller whose certificate chains to --ca (no identity check; mTLS stays)",
    )
    parser.add_argument(
        "--unsafe-upstream",
        action="store_true",
        help="allow an --upstream that is not on loopback (the upstream hop is plaintext)",
    )
    parser.add_argument(
        "--drain-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long in-flight calls may finish (default: %(default)gs)",
    )
    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="(default: %(default)s)"
    )
    logs.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="(default: %(default)s)"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        mode=args.mode,
        upstream=parse_address(args.upstream, "--upstream", allow_unix=True),
        listen=parse_address(args.listen, "--listen"),
        cert=Path(args.cert),
        key=Path(args.key),
        ca=Path(args.ca),
        allow=AllowRules(
            cn=tuple(args.allow_cn),
            dns=tuple(args.allow_dns),
            uri=tuple(args.allow_uri),
            allow_all=args.allow_all,
        ),
        unsafe_upstream=args.unsafe_upstream,
        log_format=args.log_format,
        log_level=args.log_level,
        drain_grace=args.drain_grace,
    )


def _run_event_loop(config: Config) -> int:
    from sidecar.server import run  # imports grpc: after GRPC_VERBOSITY is settled

    try:
        import uvloop
    except ImportError:  # uvloop is optional: grpc.aio works on the stock loop too
        return asyncio.run(run(config))
    return int(uvloop.run(run(config)))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["certs"]:
        from sidecar.certs_cli import main as certs_main

        return certs_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"sidecar: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from sidecar import logs

    logs.configure(config.log_format, config.log_level)
    if config.log_format == "json":
        # grpc core writes its own plain-text lines to stderr; keep the stream JSON.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        return _run_event_loop(config)
    except ConfigError as exc:
        print(f"sidecar: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
