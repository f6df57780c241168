"""`sidecar explain`: would this caller be allowed this method, which rule decides, and why
each rule before it did not.

    sidecar explain --config sidecar.yaml --route kv --cert caller.pem --method /kv.KV/Put
    sidecar explain --config sidecar.yaml --cn billing --ou platform --method /kv.KV/Get

The decision is the running sidecar's own (auth/policy.py, on the route's rules as the
configuration gives them). A caller given by its certificate is checked against the
route's CRLs too (read and checked as the sidecar does); one given by its names is not
(it has no serial), and the output says so. Exit 0 allowed,
1 denied, 2 a usage or configuration error (one line). For operators answering "why was
this denied", and for CI checking a policy change.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from cryptography import x509

from sidecar.auth.identity import PeerIdentity, identity_from_certificate
from sidecar.auth.policy import Policy
from sidecar.config.model import RouteConfig
from sidecar.config.pem import read_bytes
from sidecar.config.sources import CONFIG_ENV, load
from sidecar.errors import EXIT_RUNTIME, EXIT_USAGE, ConfigError
from sidecar.pki.revocation import CrlSource, Revocations

EXIT_ALLOWED = 0
EXIT_DENIED = EXIT_RUNTIME  # 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"sidecar explain: usage error: {message} (see sidecar explain --help)",
              file=sys.stderr)  # fmt: skip
        self.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sidecar explain",
        description="Say whether a caller may call a method on a route, and why.",
    )
    parser.add_argument("--config", metavar="FILE", help=f"the sidecar's config (or {CONFIG_ENV})")
    parser.add_argument("--route", metavar="NAME", help="the route, by name (default: the only "
                        "ingress route)")  # fmt: skip
    parser.add_argument("--method", required=True, metavar="/package.Service/Method")
    parser.add_argument("--cert", metavar="FILE", help="the caller's certificate (PEM)")
    names = (("cn", "subject CN"), ("dns", "DNS SAN"), ("uri", "URI SAN"), ("ou", "subject OU"))
    for kind, what in names:
        help_text = f"instead of --cert: a {what} of the caller (repeatable)"
        parser.add_argument(
            f"--{kind}", action="append", default=[], metavar="NAME", help=help_text
        )
    return parser


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        route = _route(args)
        identity = _identity(args)
        revocations = _revocations(route) if args.cert else None
    except ConfigError as error:
        print(f"sidecar explain: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE
    decision, steps = Policy(route.allow, revocations).explain(identity, args.method)
    if route.crl and not args.cert:
        steps.insert(0, "crl: not checked (give the caller's certificate with --cert)")
    print(f"{route.title}: {args.method} by {identity.description}")
    for step in steps:
        print(f"  {step}")
    if decision.allowed:
        audit = f" (audit mode would deny: {decision.audit})" if decision.audit else ""
        print(f"allowed: {decision.reason}{audit}")
        return EXIT_ALLOWED
    print(f"denied: {decision.reason}")
    return EXIT_DENIED


def _route(args: argparse.Namespace) -> RouteConfig:
    config_file = args.config or os.environ.get(CONFIG_ENV)
    if not config_file:
        raise ConfigError("--config: give the sidecar's config file")
    routes = [route for route in load({}, os.environ, config_file).config.routes
              if route.mode == "ingress"]  # fmt: skip
    if args.route is not None:
        named = [route for route in routes if route.name == args.route]
        if not named:
            known = ", ".join(repr(route.name) for route in routes if route.name) or "none"
            raise ConfigError(f"--route: no ingress route named {args.route!r} (named: {known})")
        return named[0]
    if len(routes) != 1:
        raise ConfigError(f"--route: {len(routes)} ingress routes; name one")
    return routes[0]


def _revocations(route: RouteConfig) -> Revocations | None:
    """The route's CRLs, checked against its CA bundle as the sidecar checks them."""
    if not route.crl:
        return None
    assert route.ca is not None  # a route with crl has cert, key and ca
    crl = CrlSource(route.crl, route.crl_stale, route.ca.read(), route.label("ca"))
    return crl.current


def _identity(args: argparse.Namespace) -> PeerIdentity:
    names = (args.cn, args.dns, args.uri, args.ou)
    if args.cert and any(names):
        raise ConfigError("--cert, or --cn/--dns/--uri/--ou: not both")
    if args.cert:
        data = read_bytes(Path(args.cert), "--cert")
        try:
            certificate = x509.load_pem_x509_certificate(data)
        except ValueError:
            raise ConfigError(f"--cert: {args.cert} is not a PEM certificate") from None
        return identity_from_certificate(certificate)
    if not any(names):
        raise ConfigError("give the caller: --cert FILE, or --cn/--dns/--uri/--ou")
    return PeerIdentity(
        common_names=tuple(args.cn),
        dns_names=tuple(args.dns),
        uris=tuple(args.uri),
        organizational_units=tuple(args.ou),
    )
