"""The sidecar's configuration: frozen values, validated when they are built.

A `Config` holds the process-wide settings and one or more `RouteConfig`s (a
listener, its credentials and allowlist, and its upstream). Every rule about what
a valid configuration is lives here, and every error names where the setting at
fault came from (`--upstream`, `SIDECAR_CA`, `sidecar.yaml: routes[1].allow_cn`).
How values are gathered from flags, environment and file is `sources.py`;
files are read and checked by `pki/tls.py`, when credentials are built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from sidecar.config.addresses import Address
from sidecar.config.limits import Limits
from sidecar.config.pem import PemSource
from sidecar.config.rules import MethodRule, RuleMode
from sidecar.config.settings import BY_KEY, IDENTITY_ELEMENTS
from sidecar.errors import ConfigError
from sidecar.observe.logs import LogFormat

Mode = Literal["ingress", "egress"]
DataPlaneName = Literal["splice", "grpc"]
# A CRL past its nextUpdate: warn, or deny its issuer's callers (pki/revocation.py).
StaleAction = Literal["warn", "deny"]
GrpcHealth = Literal["app", "sidecar"]
UpstreamHealthCheck = Literal["tcp", "grpc"]

DEFAULT_INGRESS_LISTEN = Address("0.0.0.0", 8443)

# Settings grpc core's server has no equivalent for (the budgets not listed map to its channel
# arguments: see grpcplane/plane.py).
_SPLICE_ONLY = frozenset(
    {
        "max_connections",
        "max_pending_handshakes",
        "max_chain_length",
        "connect_timeout",
        "header_timeout",
        "max_header_fields",
        "control_frame_rate",
        "reset_rate",
        "denied_calls",
        "denied_lifetime",
        "session_tickets",  # (grpc core's TLS has its own)
    }
)


@dataclass(frozen=True)
class AllowRules:
    """The allowlist as the user wrote it (flags or settings)."""

    cn: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    ou: tuple[str, ...] = ()
    allow_all: bool = False
    # Per-method rules (config file), tried in order after the callers above, who may call
    # every method.
    rules: tuple[MethodRule, ...] = ()
    # Revoked certificates, refused whatever the rules say: serials and SHA-256
    # fingerprints, as lowercase hex (serials without leading zeros).
    deny_serials: frozenset[str] = frozenset()
    deny_fingerprints: frozenset[str] = frozenset()
    # audit: what the rules would deny is let through and logged (a policy being tried).
    rules_mode: RuleMode = "enforce"

    @property
    def empty(self) -> bool:
        return not (self.cn or self.dns or self.uri or self.ou or self.rules)

    def callers(self) -> list[tuple[str, tuple[str, ...]]]:
        """The allow_* patterns given, by setting key: (`allow_cn`, patterns), ..."""
        kinds = (("allow_cn", self.cn), ("allow_dns", self.dns), ("allow_uri", self.uri),
                 ("allow_ou", self.ou))  # fmt: skip
        return [(key, patterns) for key, patterns in kinds if patterns]


@dataclass(frozen=True)
class RouteConfig:
    """One listener and where its calls go."""

    mode: Mode
    listen: Address
    upstream: Address
    # The route's own certificate chain, key and CA bundle: PEM sources, or, instead, a
    # SPIFFE Workload API's socket (unix:/path) that pushes them.
    cert: PemSource | None = None
    key: PemSource | None = None
    ca: PemSource | None = None
    spiffe_socket: str | None = None
    allow: AllowRules = field(default_factory=AllowRules)
    # Ingress: CRLs, each signed by a CA of `ca`, reloaded with it (pki/revocation.py).
    crl: tuple[PemSource, ...] = ()
    crl_stale: StaleAction = "warn"
    server_name: str | None = None
    # Ingress: TLS 1.3 tickets sent after each full handshake (splice/listener.py).
    session_tickets: int = 1
    unsafe_upstream: bool = False
    unsafe_listen: bool = False
    data_plane: DataPlaneName = "splice"
    # Ingress: the caller's identity for the app (auth/forwarded.py), and which elements.
    identity_header: bool = False
    identity_header_fields: tuple[str, ...] = IDENTITY_ELEMENTS
    # Ingress: who answers grpc.health.v1 calls, and how readiness checks the app.
    grpc_health: GrpcHealth = "app"
    upstream_health_check: UpstreamHealthCheck = "tcp"
    name: str | None = None
    limits: Limits = field(default_factory=Limits)
    # Where each setting given came from, for error messages: key -> `--upstream`,
    # `SIDECAR_UPSTREAM` or `sidecar.yaml: routes[0].upstream`.
    where: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    # The route's place in the config file (`sidecar.yaml: routes[1]`), when it
    # is one of several; None for the single route of flags, env or a flat file.
    location: str | None = field(default=None, compare=False, repr=False)
    # A config file is in use: name settings not given by their keys, not their flags.
    from_file: bool = field(default=False, compare=False, repr=False)

    def label(self, key: str) -> str:
        """How errors name a setting of this route: where it was set, or how to set it."""
        if key in self.where:
            return self.where[key]
        if self.location:
            return f"{self.location}.{key}"
        return key if self.from_file else BY_KEY[key].flag_name

    @property
    def tls_name(self) -> str:
        """Egress: the name the remote's certificate must carry."""
        return self.server_name or self.upstream.host

    @property
    def title(self) -> str:
        """How log lines name this route: its name, or its mode when it has none."""
        return f"route {self.name!r} ({self.mode})" if self.name else self.mode

    def __post_init__(self) -> None:
        pem_sources = (self.cert, self.key, self.ca)
        from_files = None not in pem_sources
        from_agent = self.spiffe_socket is not None and pem_sources == (None, None, None)
        if not (from_files or from_agent):
            raise ConfigError("a route takes cert, key and ca, or spiffe_socket instead")
        if self.mode == "ingress":
            self._check_ingress()
        else:
            self._check_egress()
        if self.data_plane == "grpc":
            self._check_grpc_plane()
        if self.crl and from_agent:
            raise ConfigError(
                f"{self.label('crl')} needs cert, key and ca: it is checked against the ca "
                "bundle (SPIFFE SVIDs are short-lived; refuse one now with deny_serials)"
            )
        if "crl_stale" in self.where and not self.crl:
            raise ConfigError(f"{self.label('crl_stale')} is given, but no crl")
        unknown = [f for f in self.identity_header_fields if f not in IDENTITY_ELEMENTS]
        if unknown:
            raise ConfigError(
                f"{self.label('identity_header_fields')}: {unknown[0]!r} is not one of "
                f"{', '.join(IDENTITY_ELEMENTS)}"
            )

    def _check_grpc_plane(self) -> None:
        """The per-call plane runs on grpc core's HTTP/2 server, which has its own budgets:
        a budget it cannot honour is refused when given, never silently ignored."""
        for key in self.where:
            if key in _SPLICE_ONLY:
                raise ConfigError(
                    f"{self.label(key)} applies to data_plane splice only (grpc core, which "
                    "serves data_plane grpc, has no such setting)"
                )

    def _check_ingress(self) -> None:
        allow = self.allow
        if allow.empty and not allow.allow_all:
            if self.location or self.from_file:
                prefix = f"{self.location}: " if self.location else ""
                names, opt_out = ("allow_cn", "allow_dns", "allow_uri"), "allow_all: true"
            else:
                prefix, names = "", ("--allow-cn", "--allow-dns", "--allow-uri")
                opt_out = "--allow-all"
            raise ConfigError(
                f"{prefix}no allow rule: give {names[0]}, {names[1]} or {names[2]} (or "
                f"allow_ou, or per-method rules in the config file), or {opt_out} to accept "
                "any certificate signed by the CA"
            )
        if allow.allow_all and not allow.empty:
            raise ConfigError(
                f"{self.label('allow_all')} cannot be combined with "
                "allow_cn/allow_dns/allow_uri/allow_ou or rules"
            )
        if not self.upstream.is_loopback and not self.unsafe_upstream:
            raise ConfigError(
                f"{self.label('upstream')} {self.upstream} is not on loopback: the hop to the "
                f"upstream is plaintext; set {self.label('unsafe_upstream')} to allow it"
            )
        for key, is_set in (
            ("server_name", self.server_name is not None),
            ("unsafe_listen", self.unsafe_listen),
        ):
            if is_set:
                raise ConfigError(f"{self.label(key)} applies to egress routes only")

    def _check_egress(self) -> None:
        if not self.listen.is_loopback and not self.unsafe_listen:
            raise ConfigError(
                f"{self.label('listen')} {self.listen} is not on loopback: an egress listener "
                "accepts plaintext calls and lends them this route's client certificate; "
                f"set {self.label('unsafe_listen')} to allow it"
            )
        if self.upstream.unix_path is not None:
            raise ConfigError(
                f"{self.label('upstream')}: an egress upstream is a remote HOST:PORT, "
                "not a unix socket"
            )
        for key, is_set in (
            ("allow_cn", bool(self.allow.cn)),
            ("allow_dns", bool(self.allow.dns)),
            ("allow_uri", bool(self.allow.uri)),
            ("allow_ou", bool(self.allow.ou)),
            ("rules", bool(self.allow.rules)),
            ("deny_serials", bool(self.allow.deny_serials)),
            ("deny_fingerprints", bool(self.allow.deny_fingerprints)),
            ("crl", bool(self.crl)),
            ("identity_header", self.identity_header),
            ("rules_mode", self.allow.rules_mode != "enforce"),
            ("grpc_health", self.grpc_health != "app"),
            ("upstream_health_check", self.upstream_health_check != "tcp"),
            ("session_tickets", "session_tickets" in self.where),
            ("allow_all", self.allow.allow_all),
            ("unsafe_upstream", self.unsafe_upstream),
        ):
            if is_set:
                raise ConfigError(
                    f"{self.label(key)} applies to ingress routes only (an egress route "
                    "checks the remote's certificate against the CA and the server name)"
                )


@dataclass(frozen=True)
class Config:
    """Everything one sidecar process needs to serve: its routes and shared settings."""

    routes: tuple[RouteConfig, ...]
    log_format: LogFormat = "text"
    log_level: str = "info"
    drain_grace: float = 10.0
    workers: int = 1  # processes serving every route (runtime/workers.py)
    reload_interval: float = 0.0  # 0: credentials reload on SIGHUP only
    # The admin listener (runtime/admin.py): off when None.
    admin: Address | None = None
    unsafe_admin: bool = False
    metrics_methods: int = 100  # per route, then `other` (observe/metrics.py)
    metrics_callers: int | None = None  # calls by caller too: per route, then `other`

    def __post_init__(self) -> None:
        if not self.routes:
            raise ConfigError("routes: at least one route is needed")
        names: dict[str, RouteConfig] = {}
        listeners: dict[Address, RouteConfig] = {}
        for route in self.routes:
            if route.name is not None:
                if route.name in names:
                    raise ConfigError(f"{route.label('name')}: {route.name!r} names two routes")
                names[route.name] = route
            if route.listen.port != 0 or route.listen.unix_path:
                other = listeners.get(route.listen)
                if other is not None:
                    raise ConfigError(
                        f"{route.label('listen')}: {route.listen} is also "
                        f"{other.label('listen')}; each route needs its own listener"
                    )
                listeners[route.listen] = route


def certificate_hex(values: tuple[str, ...], where: str, *, fingerprint: bool) -> frozenset[str]:
    """Serials or SHA-256 fingerprints as users copy them (`0A:1B`, `serial=0A1B`, any case)
    in the one form identities carry: lowercase hex, serials without leading zeros."""
    normalized = set()
    for value in values:
        digits = value.strip().lower().removeprefix("serial=").replace(":", "")
        if not digits or any(c not in "0123456789abcdef" for c in digits):
            raise ConfigError(f"{where}: {value!r} is not hexadecimal")
        if fingerprint and len(digits) != 64:
            raise ConfigError(f"{where}: {value!r} is not a SHA-256 fingerprint (64 hex digits)")
        normalized.add(digits if fingerprint else digits.lstrip("0") or "0")
    return frozenset(normalized)
