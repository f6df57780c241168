"""The list of settings: every key the sidecar takes, in one place.

Each setting is a flag (`--allow-cn`), an environment variable
(`SIDECAR_ALLOW_CN`) and a config-file key (`allow_cn`), all derived from the
one entry below. The command line builds its parser from this table, the loader
checks files and the environment against it, and the example config is tested
to document every key. This module also turns a raw value from any source into
its typed form, with errors that name where the value came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sidecar.config.addresses import Address, parse_address
from sidecar.config.pem import PemSource
from sidecar.config.rules import MethodRule, parse_rules
from sidecar.errors import ConfigError
from sidecar.host.cores import usable_cores

# text: a string; choice: one of `choices`; address: HOST:PORT or unix:/path;
# pem: a file path or inline PEM; files: a list of those (a flag repeated, commas in
# an environment variable); names: a list of strings; switch: a boolean;
# seconds: a non-negative number; count: a positive whole number; socket: unix:/path;
# processes: a count, or `auto` (the cores this process may use, host/cores.py).
# rules: a route's per-method rules (config/rules.py), from the config file only.
Kind = Literal[
    "text",
    "choice",
    "address",
    "pem",
    "files",
    "names",
    "switch",
    "seconds",
    "count",
    "processes",
    "socket",
    "rules",
]

# route: belongs to one listener (repeated per item under `routes:`);
# process: shared by the whole process (top level of the file only).
Scope = Literal["route", "process"]

MODES = ("ingress", "egress")
DATA_PLANES = ("splice", "grpc")
LOG_FORMATS = ("text", "json")
GRPC_HEALTH = ("app", "sidecar")
UPSTREAM_HEALTH_CHECKS = ("tcp", "grpc")
LOG_LEVELS = ("debug", "info", "warning", "error")


# The elements of the caller's identity header (x-forwarded-client-cert, in Envoy's XFCC
# format) that identity_header can send; auth/forwarded.py writes them.
IDENTITY_ELEMENTS = ("Hash", "Subject", "URI", "DNS")

_MAX_COUNT = 2**31 - 1  # the largest count any setting takes
ENV_PREFIX = "SIDECAR_"  # each setting's variable: SIDECAR_<KEY>


@dataclass(frozen=True)
class Setting:
    key: str
    kind: Kind
    scope: Scope
    group: str
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    default: object = None
    flag: bool = True  # settable by a command-line flag and an environment variable
    shortest: float = 0.0  # seconds: a value above 0 and below this is refused (0 stays "off")
    least: int = 1  # count: the smallest value taken
    most: int = _MAX_COUNT  # count: the largest value taken

    @property
    def flag_name(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.key.upper()


# fmt: off
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "name", "text", "route", "route",
        "a name for the route in logs and errors (config file only)",
        flag=False,
    ),
    Setting(
        "mode", "choice", "route", "route",
        "ingress: accept mTLS callers and relay to a plaintext upstream on loopback; "
        "egress: accept plaintext local callers and relay over mTLS to a remote",
        choices=MODES, default="ingress",
    ),
    Setting(
        "listen", "address", "route", "route",
        "where callers connect; port 0 picks a free port (ingress default: 0.0.0.0:8443; "
        "egress: required, loopback or unix:/path unless --unsafe-listen)",
        metavar="HOST:PORT",
    ),
    Setting(
        "upstream", "address", "route", "route",
        "where calls go: ingress, the plain gRPC service (localhost:50051, unix:/run/app.sock), "
        "loopback unless --unsafe-upstream; egress, the remote ingress sidecar",
        metavar="HOST:PORT",
    ),
    Setting(
        "cert", "pem", "route", "TLS",
        "own certificate chain, PEM, leaf first (a file, or the PEM text itself)",
        metavar="FILE|PEM",
    ),
    Setting(
        "key", "pem", "route", "TLS",
        "private key of --cert, PEM, unencrypted (a file, or the PEM text itself)",
        metavar="FILE|PEM",
    ),
    Setting(
        "ca", "pem", "route", "TLS",
        "CA bundle, PEM: ingress, callers' certificates must chain to it; egress, the "
        "remote's must",
        metavar="FILE|PEM",
    ),
    Setting(
        "spiffe_socket", "socket", "route", "TLS",
        "take the certificate, key and CA bundle from this SPIFFE Workload API (a SPIRE "
        "agent's socket) and follow its rotations, instead of --cert, --key and --ca "
        "(default, when none of those is given: $SPIFFE_ENDPOINT_SOCKET)",
        metavar="unix:PATH",
    ),
    Setting(
        "session_tickets", "count", "route", "TLS",
        "ingress: TLS 1.3 session tickets sent after each full handshake, for callers that "
        "resume sessions (each costs ~0.2 ms of CPU per handshake; gRPC clients do not resume "
        "by default: 0 saves it)",
        metavar="N", default=1, least=0, most=8,  # (each is work per handshake)
    ),
    Setting(
        "server_name", "text", "route", "TLS",
        "egress: the name the remote's certificate must carry (default: the --upstream host)",
        metavar="NAME",
    ),
    Setting(
        "allow_cn", "names", "route", "allowlist",
        "allow callers whose certificate subject CN matches (repeatable; glob allowed)",
        metavar="PATTERN", default=(),
    ),
    Setting(
        "allow_dns", "names", "route", "allowlist",
        "allow callers with a matching DNS SAN (repeatable; case-insensitive)",
        metavar="PATTERN", default=(),
    ),
    Setting(
        "allow_uri", "names", "route", "allowlist",
        "allow callers with a matching URI SAN, SPIFFE IDs included (repeatable)",
        metavar="PATTERN", default=(),
    ),
    Setting(
        "allow_ou", "names", "route", "allowlist",
        "allow callers whose certificate subject has a matching OU (repeatable; glob allowed)",
        metavar="PATTERN", default=(),
    ),
    Setting(
        "rules", "rules", "route", "allowlist",
        "per-method rules, tried in order after the allow_* callers: each an action (allow "
        "or deny), callers (cn, dns, uri, ou globs, or any: true) and methods (config file "
        "only; see config/sidecar.example.yaml)",
        default=(), flag=False,
    ),
    Setting(
        "rules_mode", "choice", "route", "allowlist",
        "enforce: denials are enforced; audit: every call the allow rules and method rules "
        "would deny is let through and logged (WARNING), to try a policy out (revocations "
        "are always enforced)",
        choices=("enforce", "audit"), default="enforce",
    ),
    Setting(
        "deny_serials", "names", "route", "allowlist",
        "refuse callers whose certificate has this serial, hex as `openssl x509 -serial` "
        "prints it (colons and case ignored; repeatable): a revoked certificate",
        metavar="HEX", default=(),
    ),
    Setting(
        "deny_fingerprints", "names", "route", "allowlist",
        "refuse callers whose certificate has this SHA-256 fingerprint, as `sidecar certs "
        "inspect` prints it (colons and case ignored; repeatable)",
        metavar="HEX", default=(),
    ),
    Setting(
        "crl", "files", "route", "allowlist",
        "certificate revocation lists, PEM or DER (repeatable), each signed by a CA of --ca: "
        "a caller whose certificate its issuer's CRL lists is refused, and so is one whose "
        "issuer has no CRL here; reloaded with the credentials",
        metavar="FILE", default=(),
    ),
    Setting(
        "crl_stale", "choice", "route", "allowlist",
        "a CRL past its nextUpdate: warn (a WARNING; its revocations still apply) or deny "
        "(its issuer's callers are refused until a fresh CRL is loaded)",
        choices=("warn", "deny"), default="warn",
    ),
    Setting(
        "allow_all", "switch", "route", "allowlist",
        "accept any caller whose certificate chains to --ca (no identity check; mTLS stays)",
        default=False,
    ),
    Setting(
        "identity_header", "switch", "route", "allowlist",
        "ingress: send the caller's verified identity to the app in x-forwarded-client-cert "
        "(Envoy's XFCC format); a caller's own header of that name is always dropped",
        default=False,
    ),
    Setting(
        "identity_header_fields", "names", "route", "allowlist",
        "which XFCC elements identity_header sends: Hash, Subject, URI, DNS (repeatable)",
        metavar="ELEMENT", default=IDENTITY_ELEMENTS,
    ),
    Setting(
        "unsafe_upstream", "switch", "route", "route",
        "ingress: allow an --upstream that is not on loopback (that hop is plaintext)",
        default=False,
    ),
    Setting(
        "unsafe_listen", "switch", "route", "route",
        "egress: allow a --listen that is not on loopback (local callers are not authenticated)",
        default=False,
    ),
    Setting(
        "data_plane", "choice", "route", "route",
        "splice: each caller connection is relayed frame by frame over its own upstream "
        "connection (fast); grpc: each call is relayed through grpc.aio (slower; a fallback)",
        choices=DATA_PLANES, default="splice",
    ),
    # Budgets (see limits.py): each protects the sidecar and its other callers from one
    # caller; the defaults are far above what real clients use.
    Setting(
        "max_connections", "count", "route", "limits",
        "caller connections open at once; beyond it a new caller is answered UNAVAILABLE "
        "and closed",
        metavar="N", default=10_000,
    ),
    Setting(
        "max_pending_handshakes", "count", "route", "limits",
        "TLS handshakes in progress at once; beyond it the oldest is closed",
        metavar="N", default=1_000,
    ),
    Setting(
        "handshake_timeout", "seconds", "route", "limits",
        "how long a caller has to complete its TLS handshake",
        metavar="SECONDS", default=10.0,
    ),
    Setting(
        "max_chain_length", "count", "route", "limits",
        "certificates a peer may present in its chain, leaf included (and 2 KiB of chain "
        "per certificate, 16 KiB at least: a heavier chain is refused before it is parsed)",
        metavar="N", default=10,
    ),
    Setting(
        "connect_timeout", "seconds", "route", "limits",
        "how long the upstream has to accept a connection (and finish TLS, egress) and send "
        "its first bytes",
        metavar="SECONDS", default=10.0,
    ),
    Setting(
        "idle_timeout", "seconds", "route", "limits",
        "a caller connection with no call in flight for this long is closed (GOAWAY first); "
        "0: never",
        metavar="SECONDS", default=300.0,
    ),
    Setting(
        "header_timeout", "seconds", "route", "limits",
        "how long a caller may take to send a header block or frame it has started",
        metavar="SECONDS", default=10.0,
    ),
    Setting(
        "max_header_list_size", "count", "route", "limits",
        "bytes of a request's header list, decoded (RFC 9113 6.5.2); larger requests are "
        "answered RESOURCE_EXHAUSTED",
        metavar="BYTES", default=16_384,
    ),
    Setting(
        "max_header_fields", "count", "route", "limits",
        "fields in a request's header list; more are answered RESOURCE_EXHAUSTED",
        metavar="N", default=256,
    ),
    Setting(
        "control_frame_rate", "count", "route", "limits",
        "control frames (PING, SETTINGS, PRIORITY, RST_STREAM, WINDOW_UPDATE, empty DATA) per "
        "second a caller connection may send, in bursts of ten times that; DATA relayed to it "
        "earns more; beyond it the connection is closed (GOAWAY ENHANCE_YOUR_CALM)",
        metavar="N", default=1_000,
    ),
    Setting(
        "reset_rate", "count", "route", "limits",
        "calls per second a caller connection may cancel before the upstream answered, in "
        "bursts of ten times that; beyond it the connection is closed (GOAWAY "
        "ENHANCE_YOUR_CALM; the 'rapid reset' attack)",
        metavar="N", default=100,
    ),
    Setting(
        "denied_calls", "count", "route", "limits",
        "calls answered PERMISSION_DENIED on one connection of a denied caller before it "
        "is closed",
        metavar="N", default=100,
    ),
    Setting(
        "denied_lifetime", "seconds", "route", "limits",
        "how long a denied caller's connection stays open",
        metavar="SECONDS", default=10.0,
    ),
    Setting(
        "drain_grace", "seconds", "process", "process",
        "on SIGTERM/SIGINT, how long in-flight calls may finish",
        metavar="SECONDS", default=10.0,
    ),
    Setting(
        "workers", "processes", "process", "process",
        "processes serving every route, sharing its listeners (auto: one per usable core); "
        "the splice data plane only",
        metavar="N|auto", default=1, most=64,
    ),
    Setting(
        "reload_interval", "seconds", "process", "process",
        "how often every route's certificate, key and CA files, and the --config file, are "
        "read and, when their content changed, reloaded as SIGHUP does; 0: only on SIGHUP",
        metavar="SECONDS", default=0.0, shortest=0.1,
    ),
    Setting(
        "admin", "address", "process", "observability",
        "serve /metrics (Prometheus), /healthz, /readyz and /status over plain HTTP here "
        "(loopback or unix:/path unless --unsafe-admin; off when unset)",
        metavar="HOST:PORT",
    ),
    Setting(
        "unsafe_admin", "switch", "process", "observability",
        "allow an --admin address that is not on loopback (it has no authentication)",
        default=False,
    ),
    Setting(
        "grpc_health", "choice", "route", "observability",
        "ingress: who answers grpc.health.v1.Health calls: app (relayed, the default) or "
        "sidecar (answered from the route's readiness, SERVING or NOT_SERVING, for any "
        "caller whose certificate the CA signed)",
        choices=GRPC_HEALTH, default="app",
    ),
    Setting(
        "upstream_health_check", "choice", "route", "observability",
        "ingress: how readiness checks the app every second: tcp (it accepts a connection) "
        "or grpc (its grpc.health.v1 Check answers SERVING)",
        choices=UPSTREAM_HEALTH_CHECKS, default="tcp",
    ),
    Setting(
        "metrics_methods", "count", "process", "observability",
        "distinct methods per route that metrics label by name; later ones count as 'other'",
        metavar="N", default=100,
    ),
    Setting(
        "metrics_callers", "count", "process", "observability",
        "count calls by caller identity too (sidecar_calls_by_caller_total): the first N "
        "distinct callers per route by name, later ones as 'other' (off when unset)",
        metavar="N",
    ),
    Setting(
        "log_format", "choice", "process", "logging", "", choices=LOG_FORMATS, default="text"
    ),
    Setting(
        "log_level", "choice", "process", "logging", "", choices=LOG_LEVELS, default="info"
    ),
)
# fmt: on

BY_KEY: dict[str, Setting] = {setting.key: setting for setting in SETTINGS}
ROUTE_KEYS = tuple(setting.key for setting in SETTINGS if setting.scope == "route")
PROCESS_KEYS = tuple(setting.key for setting in SETTINGS if setting.scope == "process")
REQUIRED_ROUTE_KEYS = ("upstream",)
CREDENTIAL_KEYS = ("cert", "key", "ca")  # required unless spiffe_socket replaces them
# The variable SPIFFE's own tools read the Workload API's address from (the SPIFFE
# Workload Endpoint specification): spiffe_socket's default.
SPIFFE_ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"

_MAX_SECONDS = 86_400 * 365  # anything longer is a typo


Value = (
    str | Address | PemSource | tuple[PemSource, ...] | tuple[str, ...] | tuple[MethodRule, ...]
    | bool | float | int
)  # fmt: skip


def from_text(setting: Setting, text: str, where: str, base: Path | None = None) -> Value:
    """The typed value of a flag argument or environment variable.

    Lists in one string are comma-separated (`SIDECAR_ALLOW_CN=alice,bob`); switches
    take exactly `true` or `false` (or 1/0), never a guess.
    """
    if setting.kind == "names":
        if not text.strip():
            # An empty variable would silently replace the file's list with nothing.
            raise ConfigError(f"{where}: empty; unset it, or give comma-separated names")
        return names([name.strip() for name in text.split(",")], where)
    if setting.kind == "files":
        return files(text.split(","), where, base)
    if setting.kind == "switch":
        lowered = text.strip().lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {text!r}")
    if setting.kind == "seconds":
        try:
            seconds = float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number of seconds, got {text!r}") from None
        return _seconds(seconds, where, setting.shortest)
    if setting.kind == "processes" and text.strip() == "auto":
        return min(usable_cores(), setting.most)
    if setting.kind in ("count", "processes"):
        try:
            count = int(text.strip())
        except ValueError:
            wanted = "a whole number" if setting.kind == "count" else "a whole number or auto"
            raise ConfigError(f"{where}: expected {wanted}, got {text!r}") from None
        return _count(count, where, setting.least, setting.most)
    return _from_string(setting, text, where, base)


def from_file(setting: Setting, value: object, where: str, base: Path) -> Value:
    """The typed value of a config-file entry, after checking its YAML type."""
    if setting.kind == "rules":
        return parse_rules(value, where, names)
    if setting.kind == "names":
        if isinstance(value, str):
            value = [value]  # `allow_cn: alice` reads as the one-element list it means
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where}: expected a list of strings, e.g. [alice, bob]")
        return names(value, where)
    if setting.kind == "files":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where}: expected a file, or a list of files")
        return files(value, where, base)
    if setting.kind == "switch":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if setting.kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number of seconds, got {value!r}")
        try:
            return _seconds(float(value), where, setting.shortest)
        except OverflowError:
            raise ConfigError(f"{where}: {value} seconds is out of range") from None
    if setting.kind == "processes" and value == "auto":
        return min(usable_cores(), setting.most)
    if setting.kind in ("count", "processes"):
        if isinstance(value, bool) or not isinstance(value, int):
            wanted = "a whole number" if setting.kind == "count" else "a whole number or auto"
            raise ConfigError(f"{where}: expected {wanted}, got {value!r}")
        return _count(value, where, setting.least, setting.most)
    if not isinstance(value, str):
        # The type only: the value may be a private key pasted as a YAML list.
        example = {
            "address": " like 127.0.0.1:50051",
            "pem": " (a path or PEM text)",
            "socket": " like unix:/run/spire/agent.sock",
        }
        raise ConfigError(
            f"{where}: expected a string{example.get(setting.kind, '')}, got {type(value).__name__}"
        )
    return _from_string(setting, value, where, base)


def _from_string(setting: Setting, text: str, where: str, base: Path | None) -> Value:
    if setting.kind == "socket":
        return _unix_socket(text, where)
    if setting.kind == "address":
        return parse_address(text, where, allow_unix=True)
    if setting.kind == "pem":
        return PemSource.parse(text, where, base)
    if setting.kind == "choice" and text not in setting.choices:
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(setting.choices)}")
    if not text:
        raise ConfigError(f"{where}: must not be empty")
    return text


def names(items: Sequence[str], where: str) -> tuple[str, ...]:
    """A list of allow patterns; an empty one would look like a rule and match nothing."""
    if any(not item.strip() for item in items):
        raise ConfigError(f"{where}: empty name in the list")
    for item in items:
        # Only printable ASCII names ever match (see policy.py): such a rule would be dead.
        if not (item.isascii() and item.isprintable()):
            raise ConfigError(
                f"{where}: {item!r} is not printable ASCII, and no certificate name that is not "
                "can match a rule (write an internationalised DNS name in its xn-- form)"
            )
    return tuple(items)


def files(items: Sequence[str], where: str, base: Path | None = None) -> tuple[PemSource, ...]:
    """A list of files (or PEM texts), relative to base; at least one."""
    if not items:
        raise ConfigError(f"{where}: expected at least one file")
    return tuple(PemSource.parse(item, where, base) for item in items)


def _count(value: int, where: str, least: int = 1, most: int = _MAX_COUNT) -> int:
    if value < least:
        raise ConfigError(f"{where}: {value} must be at least {least}")
    if value > most:
        raise ConfigError(f"{where}: {value} is out of range (at most {most})")
    return value


def _seconds(value: float, where: str, shortest: float = 0.0) -> float:
    if not math.isfinite(value) or value > _MAX_SECONDS:
        raise ConfigError(f"{where}: {value:g} seconds is out of range (at most {_MAX_SECONDS})")
    if value < 0:
        raise ConfigError(f"{where}: {value:g} must not be negative")
    if 0 < value < shortest:  # a period so short it would keep the process busy
        raise ConfigError(
            f"{where}: {value:g} seconds is too short (at least {shortest:g}; 0: off)"
        )
    return value


def _unix_socket(text: str, where: str) -> str:
    """A unix socket's address as SPIFFE writes it: unix:/path or unix:///path (absolute)."""
    path = text.removeprefix("unix://") if text.startswith("unix:///") else text[5:]
    absolute = path.startswith("/") and not path.startswith("//")  # no unix://authority/
    if not text.startswith("unix:") or not absolute or "\0" in path:
        raise ConfigError(
            f"{where}: expected unix:/ABSOLUTE/PATH (the Workload API's socket), got {text!r}"
        )
    return f"unix:{path}"
