"""`sidecar probe`: ask the admin listener a question, for health checks without curl.

    sidecar probe /readyz            # the admin address from $SIDECAR_ADMIN
    sidecar probe --admin 127.0.0.1:9901 /healthz

Exit 0 when the answer is 200, 1 otherwise (the answer's first line, or why there was
none, on stderr), 2 for a usage error. The Dockerfile's HEALTHCHECK and the Kubernetes
probes run it; it opens one connection and waits at most --timeout seconds.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from sidecar.config.addresses import parse_address
from sidecar.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"sidecar probe: usage error: {message} (see sidecar probe --help)",
              file=sys.stderr)  # fmt: skip
        self.exit(EXIT_USAGE)


def main(argv: Sequence[str]) -> int:
    parser = _Parser(prog="sidecar probe", description="GET a path of the admin listener; "
                     "exit 0 on 200, else 1.")  # fmt: skip
    parser.add_argument("path", choices=["/healthz", "/readyz", "/status", "/metrics"])
    parser.add_argument("--admin", metavar="HOST:PORT", help="the admin listener (default: "
                        "$SIDECAR_ADMIN)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    text = args.admin or os.environ.get("SIDECAR_ADMIN")
    try:
        if not text:
            raise ConfigError("--admin: give the admin listener's address (or SIDECAR_ADMIN)")
        address = parse_address(text, "--admin" if args.admin else "SIDECAR_ADMIN",
                                allow_unix=False)  # fmt: skip
    except ConfigError as error:
        print(f"sidecar probe: {error}", file=sys.stderr)
        return EXIT_USAGE
    connection = http.client.HTTPConnection(address.host, address.port, timeout=args.timeout)
    try:
        connection.request("GET", args.path)
        response = connection.getresponse()
        body = response.read(65536).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as error:
        print(f"sidecar probe: {address}{args.path}: no answer: {error}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        connection.close()
    if response.status != 200:
        first = " ".join(body.split())[:500]
        print(f"sidecar probe: {args.path}: {response.status}: {first}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK
