"""The command line: gather the configuration, run the sidecar, map failures to exit codes.

Exit codes: 0 after a clean drain; 2 for a usage or configuration error (one
line naming the flag or file, no traceback); 1 for a runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import logging
import os
import re
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, NoReturn

from sidecar import __version__
from sidecar.config.model import Config
from sidecar.config.settings import BY_KEY, SETTINGS
from sidecar.config.sources import CONFIG_ENV, Loaded, load
from sidecar.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, ConfigError, StartupError
from sidecar.host import allocator
from sidecar.runtime.worker import WorkerSetup

_DESCRIPTION = """\
Put mutual TLS and a caller allowlist in front of a plain gRPC service, with no
change to the service (ingress), or let a plain client reach a remote service
over mutual TLS (egress). Every call is relayed as raw bytes: all four call
types, metadata, headers, trailers, status details, deadlines and cancellation.

  sidecar --upstream localhost:50051 --cert server.pem --key server.key \\
          --ca ca.pem --allow-cn alice --allow-cn bob
  sidecar --mode egress --listen 127.0.0.1:50052 --upstream app.internal:8443 \\
          --cert client.pem --key client.key --ca ca.pem
  sidecar --config sidecar.yaml
  sidecar certs --help
  sidecar explain --config sidecar.yaml --cert caller.pem --method /kv.KV/Put
  sidecar probe /readyz     (a health check: asks the admin listener, exit 0 when ready)
  sidecar dial localhost:8443 --cert alice.pem --key alice.key --ca ca.pem
                            (connect as a client would: each step, and the fix for a failure)
"""

_EPILOG = """\
settings: every flag --some-key is also the environment variable SIDECAR_SOME_KEY
(lists comma-separated) and the key some_key in the --config file (YAML). Flags
win over the environment, which wins over the file. --cert, --key and --ca take a
file or the PEM text itself (a value starting with -----BEGIN).
patterns: --allow-* take exact names or globs; '*' matches within one label
(no '.' in CN/DNS, no '/' in URIs), '**' matches across labels, e.g.
--allow-dns '*.prod.example.com', --allow-uri 'spiffe://example.org/ns/prod/**'.
exit codes: 0 clean stop, 1 runtime failure, 2 usage or configuration error.
"""

_GROUPS = {
    "route": None,  # the main group
    "TLS": "TLS (a file path or inline PEM)",
    "allowlist": "allowlist, ingress (decided once per connection, again on a reload; method "
    "rules per method; a caller matching no rule gets PERMISSION_DENIED for each call)",
    "limits": "limits (budgets per caller connection; the defaults are far above what real "
    "clients use)",
    "process": None,
    "observability": "observability (the admin listener and its metrics)",
    "logging": "logging",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, naming the flag, instead of argparse's usage block.
        hint = _flag_hint(message)
        _say(f"usage error: {message}{hint} (see sidecar --help)")
        self.exit(EXIT_USAGE)


def _say(message: str) -> None:
    """Print an error as one line on stderr, never echoing PEM text (it may be a private key)."""
    message = _PEM_TEXT.sub("<PEM text, not shown>", message)
    print(f"sidecar: {' '.join(message.split())}", file=sys.stderr)


_PEM_TEXT = re.compile(r"-----BEGIN.*?(-----END[^-]*-----|$)", re.DOTALL)


def _flag_hint(message: str) -> str:
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return ""
    unknown = message[len(prefix) :].split()[0].split("=")[0]
    known = [setting.flag_name for setting in SETTINGS] + ["--config", "--check-config"]
    close = difflib.get_close_matches(unknown, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def build_parser() -> argparse.ArgumentParser:
    """The command line, built from the settings table: absent flags stay absent."""
    parser = _Parser(
        prog="sidecar",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"YAML file with the settings (or {CONFIG_ENV}); see config/sidecar.example.yaml",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate everything (files included), print the effective configuration with "
        "the source of each value, and exit",
    )
    groups = {
        name: parser if title is None else parser.add_argument_group(title)
        for name, title in _GROUPS.items()
    }
    for setting in SETTINGS:
        if not setting.flag:
            continue
        help_text = setting.help
        if setting.default not in (None, (), False):
            help_text += " (default: %(default)s)"
        options: dict[str, object] = {"help": help_text or None}
        if setting.kind == "switch":
            options["action"] = "store_true"
        else:
            options["metavar"] = setting.metavar
            if setting.kind in ("names", "files"):
                options["action"] = "append"
            if setting.choices:
                options["choices"] = setting.choices
                options.pop("metavar")
        argument = groups[setting.group].add_argument(setting.flag_name, **options)  # type: ignore[arg-type]
        if setting.default not in (None, (), False):
            argument.default = argparse.SUPPRESS
            # Shown in --help only; the loader applies defaults after the file and env.
            argument.help = (argument.help or "").replace("%(default)s", str(setting.default))
    return parser


def load_from_args(
    args: argparse.Namespace, environ: Mapping[str, str], file_bytes: bytes | None = None
) -> Loaded:
    """The configuration from the parsed flags, the environment and the config file (or
    file_bytes, its content as read before)."""
    given = vars(args)
    flags = {key: value for key, value in given.items() if key in BY_KEY}
    config_file = given.get("config") or environ.get(CONFIG_ENV) or None
    return load(flags, environ, config_file, file_bytes)


def _run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    allocator.tune_for_relaying()
    try:
        import uvloop
    except ImportError:  # uvloop is optional: grpc.aio works on the stock loop too
        return asyncio.run(main)
    return int(uvloop.run(main))


def _serve(
    loaded: Loaded,
    args: argparse.Namespace,
    environ: Mapping[str, str],
    argv: Sequence[str],
    worker: WorkerSetup | None,
) -> int:
    """Serve in this process; or, with workers, as their supervisor or as one of them."""
    # These import grpc: after GRPC_VERBOSITY is settled.
    from sidecar.observe import accesslog
    from sidecar.runtime.server import run
    from sidecar.runtime.workers import Supervisor

    config = loaded.config
    if worker is None:
        for warning in loaded.warnings:  # (a worker's supervisor has said them)
            logging.getLogger("sidecar").warning("%s", warning)

        def reread(file_bytes: bytes | None = None) -> Config:
            return load_from_args(args, environ, file_bytes).config

        config_file = loaded.config_file
        if config.workers > 1:
            return _run_event_loop(Supervisor(config, config_file, reread, argv).run())
        return _run_event_loop(run(config, reread if config_file else None, config_file))
    accesslog.set_worker(worker.index)

    def reread_accepted() -> Config:
        """The config file as the supervisor last accepted it (see runtime/worker.py)."""
        return worker.applied(load_from_args(args, environ, worker.config_bytes()).config)

    return _run_event_loop(
        run(
            worker.applied(config),
            reread_accepted if worker.config else None,
            worker.config,  # (its periodic check looks for the supervisor's next copy)
            worker,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["certs"]:
        from sidecar.certs.cli import main as certs_main

        return certs_main(argv[1:])
    if argv[:1] == ["explain"]:
        from sidecar.runtime.explain import main as explain_main

        return explain_main(argv[1:])
    if argv[:1] == ["dial"]:
        from sidecar.runtime.dial import main as dial_main

        return dial_main(argv[1:])
    if argv[:1] == ["probe"]:
        from sidecar.runtime.probe import main as probe_main

        return probe_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        worker = WorkerSetup.from_env(os.environ)
        if worker is not None:
            worker.share_session_tickets()
        loaded = load_from_args(args, os.environ, worker.config_bytes() if worker else None)
        if getattr(args, "check_config", False):
            return _check_config(loaded)
    except ConfigError as exc:
        _say(f"config error: {exc}")
        if exc.note:
            _say(f"note: {exc.note}")
        return EXIT_USAGE

    config = loaded.config
    from sidecar.observe import logs

    logs.configure(config.log_format, config.log_level)
    if config.log_format == "json":
        # grpc core writes its own plain-text lines to stderr; keep the stream JSON.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    environ = dict(os.environ)  # as the process started: a reload reads the file only again
    try:
        return _serve(loaded, args, environ, argv, worker)
    except ConfigError as exc:
        _say(f"config error: {exc}")
        return EXIT_USAGE
    except StartupError as exc:
        _say(str(exc))
        return EXIT_RUNTIME


def _check_config(loaded: Loaded) -> int:
    """Validate every route's credentials as serving would, then print the configuration."""
    from sidecar.runtime.report import render
    from sidecar.runtime.route import Route

    routes = [Route(route) for route in loaded.config.routes]
    for warning in loaded.warnings:
        print(f"# warning: {warning}")
    print(render(loaded, [route.credentials.current().material for route in routes]), end="")
    for route in routes:
        route.credentials.close()  # a SPIFFE source's connection to its agent
    return EXIT_OK
