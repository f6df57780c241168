"""One route: its shared parts, built once, and the data plane that serves it.

Ingress: an mTLS listener that requires a client certificate, the allowlist, and
a plaintext upstream on loopback. Egress: a plaintext listener on loopback, no
allowlist (local callers are trusted as the app itself), and an upstream that
speaks mTLS with this route's client certificate.

The route builds what both data planes share (dataplane.RouteParts: credentials,
policy, header rules, call observer, TLS diagnosis) and hands it to the plane
named by `data_plane`, from DATA_PLANES: `splice` (the default: each caller
connection spliced frame by frame to its own upstream connection) or `grpc` (each
call relayed through grpc.aio).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import replace

from cryptography import x509

from sidecar.auth.headers import HeaderRules
from sidecar.auth.policy import Policy
from sidecar.config.model import AllowRules, RouteConfig
from sidecar.config.pem import PemSource
from sidecar.config.rules import shadowed
from sidecar.dataplane import DataPlane, RouteParts, Serving
from sidecar.errors import ConfigError
from sidecar.grpcplane.plane import GrpcPlane
from sidecar.observe.accesslog import access_log
from sidecar.observe.calls import NO_OBSERVER, Batched, CallObserver
from sidecar.observe.connections import NO_CONNECTION_OBSERVER
from sidecar.observe.metrics import CallsCounted, Metrics
from sidecar.pki.credentials import CredentialSource, SwappedCredentials
from sidecar.pki.diagnosis import TLSDiagnosis
from sidecar.pki.expiry import ExpiryWatch
from sidecar.pki.revocation import CrlSource
from sidecar.pki.x509 import Role, describe_names, parse_certificates
from sidecar.runtime.health import UpstreamProbe
from sidecar.splice.listener import Listener

logger = logging.getLogger("sidecar.server")

# The data planes a route can be served by, by their `data_plane` name.
DATA_PLANES: dict[str, Callable[[RouteParts], DataPlane]] = {
    "splice": Listener,
    "grpc": GrpcPlane,
}


class Route:
    """A listener relaying to one upstream, with an explicit lifecycle."""

    def __init__(
        self,
        config: RouteConfig,
        metrics: Metrics | None = None,
        label: str = "",
        listening: list[socket.socket] | None = None,
    ) -> None:
        """metrics: the process's, when an admin listener serves them; label: how they name
        this route; listening: a worker's listening sockets, bound by its supervisor."""
        self.config = config
        self._listening = listening
        self._metrics = metrics
        self._label = label
        # Read and validate certificates first: a bad file is a ConfigError before
        # anything is bound.
        role: Role = "server" if config.mode == "ingress" else "client"
        self.credentials: SwappedCredentials
        if config.spiffe_socket is not None:
            from sidecar.pki.spiffe import SpiffeSource  # imports the spiffe package

            setting = config.label("spiffe_socket")
            self.credentials = SpiffeSource(config.spiffe_socket, role, setting)
        else:
            assert config.cert is not None and config.key is not None and config.ca is not None
            self.credentials = CredentialSource(config.cert, config.key, config.ca, role)
        self.crl: CrlSource | None = None
        if config.crl:
            self.crl = CrlSource(config.crl, config.crl_stale, *self._ca())
        # Replaced in place on a reload (rules and CRLs alike).
        self.policy = Policy(config.allow, self.crl.current if self.crl else None)
        self._stale_timer: asyncio.TimerHandle | None = None
        self._plane: DataPlane | None = None
        self._batches: list[Batched] = []  # see flush_calls
        self._expiry = ExpiryWatch(config.title)
        self.port: int | None = None
        # Ingress: whether the app answers, checked in the background when readiness is
        # served (an admin listener) or answers health calls (grpc_health: sidecar).
        self.health = Serving() if config.grpc_health == "sidecar" else None
        self._ready: bool | None = None  # as last said in the log
        self._probe: UpstreamProbe | None = None
        if config.mode == "ingress" and (metrics is not None or self.health is not None):
            self._probe = UpstreamProbe(
                config.upstream, config.upstream_health_check, tried=self._readiness_changed
            )

    def _parts(self) -> RouteParts:
        config = self.config
        counted = self._metrics.route(self._label) if self._metrics is not None else None
        diagnosis = None
        if config.mode == "egress":
            diagnosis = TLSDiagnosis(
                config.upstream,
                config.tls_name,
                lambda: self.credentials.current().material,
                server_name_setting=config.label("server_name"),
                ca_setting=config.label("spiffe_socket" if config.spiffe_socket else "ca"),
                cert_setting=config.label("spiffe_socket" if config.spiffe_socket else "cert"),
            )
        return RouteParts(
            config=config,
            credentials=self.credentials,
            policy=self.policy,
            headers=HeaderRules(),
            observer=self._calls_observed(counted[0] if counted else None),
            connections=counted[1] if counted else NO_CONNECTION_OBSERVER,
            diagnosis=diagnosis,
            health=self.health,
            listening=self._listening,
        )

    def _calls_observed(self, counted: CallsCounted | None) -> CallObserver:
        """Who hears of the route's calls: the access log and the metrics, each if on."""
        observers = [observer for observer in (access_log(), counted) if observer is not None]
        if not observers:
            return NO_OBSERVER
        batched = Batched(observers)
        self._batches.append(batched)
        if self._metrics is not None:
            self._metrics.before_scrape.append(batched.flush)
        return batched

    async def start(self) -> None:
        """Bind the listener and start serving (inside the running loop)."""
        self._plane = DATA_PLANES[self.config.data_plane](self._parts())
        self.port = await self._plane.start()
        if self._probe is not None:
            self._probe.start()
        self._log_listening()
        _warn_shadowed(self.config.title, self.config.allow)
        self._crls_loaded("loaded")
        self._expiry.watch(self.credentials.current().material.leaf)
        self.credentials.on_change = self._credentials_changed
        self.credentials.watch()

    def _log_listening(self) -> None:
        config = self.config
        listen = config.listen
        where = listen.target if listen.unix_path else f"{listen.host}:{self.port}"
        if config.mode == "ingress":
            logger.info(
                "%s listening on %s (mTLS, client certificate required), relaying to %s; %s",
                config.title,
                where,
                config.upstream,
                _describe_rules(config.allow),
            )
        else:
            logger.info(
                "%s listening on %s (plaintext, local callers), relaying over mTLS to %s "
                "as %s, expecting server name %r",
                config.title,
                where,
                config.upstream,
                describe_names(self.credentials.current().material.leaf),
                config.tls_name,
            )

    def reload(
        self, config: RouteConfig | None = None, *, when_changed: bool = False, grace: float = 0
    ) -> None:
        """Read the route's certificate, key and CA bundle again and, given a reloaded
        configuration of this route (differing from the running one in
        reload.ROUTE_FIELDS_IN_PLACE only), take its allow rules and credential sources.

        New rules apply at once, to established connections too. New credentials
        serve new handshakes if they pass every start-up check; established
        connections keep theirs. Anything wrong keeps the current credentials, with
        one ERROR naming the file and the fault (the start-up checks' own words).
        when_changed (a periodic check): say nothing unless the files hold something
        not seen before. grace: how long a caller no longer allowed keeps its calls in
        flight (the drain grace).
        """
        title = self.config.title
        if config is not None and config.allow != self.config.allow:
            self.policy.replace(config.allow)
            self.config = replace(self.config, allow=config.allow)
            logger.info("%s: allowlist reloaded: %s", title, _describe_rules(config.allow))
            _warn_shadowed(title, config.allow)
            if self._plane is not None:
                self._plane.policy_replaced(grace)
        if self.config.spiffe_socket is not None:
            return  # nothing to read: the agent pushes its updates (_credentials_changed)
        sources = None
        if config is not None and (config.cert, config.key, config.ca) != self._sources():
            assert config.cert is not None and config.key is not None and config.ca is not None
            sources = (config.cert, config.key, config.ca)
        if not when_changed or self.credentials.changed(sources):
            self._reload_credentials(sources)
        self._reload_crl(config or self.config, when_changed=when_changed, grace=grace)

    def _reload_credentials(self, sources: tuple[PemSource, PemSource, PemSource] | None) -> None:
        title = self.config.title
        try:
            changed = self.credentials.reload(sources)
        except ConfigError as error:
            logger.error("%s: credentials not reloaded, the current ones stay: %s", title, error)
            return
        if sources is not None:
            self.config = replace(self.config, cert=sources[0], key=sources[1], ca=sources[2])
        if not changed:
            logger.info("%s: credentials reloaded, unchanged", title)
            return
        self._credentials_changed("reloaded")

    def _ca(self) -> tuple[bytes, str]:
        """The CA bundle in use, which CRLs are checked against, and its setting's name."""
        return self.credentials.current().material.ca_pem, self.config.label("ca")

    def _reload_crl(self, config: RouteConfig, *, when_changed: bool, grace: float) -> None:
        """Read the CRLs again (or the new configuration's), checked against the CA bundle in
        use; new ones apply at once, to established connections too, as new rules do."""
        title = self.config.title
        try:
            changed = self._read_crl(config, when_changed=when_changed)
        except ConfigError as error:
            logger.error("%s: CRLs not reloaded, the current ones stay: %s", title, error)
            return
        self.config = replace(self.config, crl=config.crl, crl_stale=config.crl_stale)
        if not changed:
            if self.crl is not None and not when_changed:
                logger.info("%s: CRLs reloaded, unchanged", title)
            return
        self.policy.replace_revocations(self.crl.current if self.crl else None)
        if self.crl is None:
            logger.info("%s: crl removed: callers are no longer checked against CRLs", title)
        self._crls_loaded("reloaded")
        if self._plane is not None:
            self._plane.policy_replaced(grace)

    def _read_crl(self, config: RouteConfig, *, when_changed: bool) -> bool:
        """Take config's CRLs (none, files added, or the same files read again): whether
        the lists in use changed. ConfigError: they did not."""
        if not config.crl:
            removed = self.crl is not None
            self.crl = None
            return removed
        wanted = (config.crl, config.crl_stale, *self._ca())
        if self.crl is None:
            self.crl = CrlSource(*wanted)
            return True
        if when_changed and not self.crl.changed(*wanted):
            return False
        return self.crl.reload(*wanted)

    def _crls_loaded(self, how: str) -> None:
        """Say which CRLs are in use, warn of the stale ones, and watch for the next to go
        stale (with crl_stale: deny, its callers are refused from that moment)."""
        if self._stale_timer is not None:
            self._stale_timer.cancel()
            self._stale_timer = None
        if self.crl is None:
            return
        revocations = self.crl.current
        for crl in revocations.lists:
            logger.info("%s: CRL %s: %s", self.config.title, how, crl.describe())
        self._warn_stale()
        next_stale = revocations.next_stale()
        if next_stale is not None:
            now = datetime.datetime.now(datetime.timezone.utc)
            delay = (next_stale - now).total_seconds() + 0.001  # just past it
            self._stale_timer = asyncio.get_running_loop().call_later(delay, self._went_stale)

    def _went_stale(self) -> None:
        self._stale_timer = None
        if self.config.crl_stale == "deny" and self._plane is not None:
            # The decision checks the date itself; established connections are told now.
            self._plane.policy_replaced(0.0)
        self._crls_loaded("still in use")

    def _warn_stale(self) -> None:
        assert self.crl is not None
        for crl in self.crl.current.stale():
            if self.config.crl_stale == "deny":
                logger.error(
                    "%s: CRL %s is stale (past its nextUpdate): callers of %s are refused "
                    "until a fresh one is loaded (crl_stale: deny)",
                    self.config.title, crl.file, crl.issuer,
                )  # fmt: skip
            else:
                logger.warning(
                    "%s: CRL %s is stale (past its nextUpdate): its revocations still apply, "
                    "but a certificate revoked since is not in it (crl_stale: warn)",
                    self.config.title, crl.file,
                )  # fmt: skip

    def _credentials_changed(self, how: str = "updated by the SPIFFE Workload API") -> None:
        """New credentials are in use for new handshakes: say which, watch their expiry, and
        let the plane move what outlives a handshake (dataplane.credentials_replaced)."""
        leaf = self.credentials.current().material.leaf
        self._expiry.watch(leaf)
        logger.info(
            "%s: credentials %s: certificate serial %x, %s, valid until %s UTC",
            self.config.title,
            how,
            leaf.serial_number,
            describe_names(leaf),
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}",
        )
        if self._plane is not None:
            self._plane.credentials_replaced()

    def _readiness_changed(self) -> None:
        """The app was checked again: readiness is said in the log when it changes, and
        what health calls are answered follows it."""
        problems = self.not_ready()
        ready = not problems
        if ready != self._ready:
            self._ready = ready
            fields = {"event": "readiness", "route": self._label, "ready": ready,
                      "not_ready": problems}  # fmt: skip
            if ready:
                logger.info("%s: ready", self.config.title, extra={"fields": fields})
            else:
                # (Each problem names the route already.)
                logger.warning("not ready: %s", "; ".join(problems), extra={"fields": fields})
        if self.health is not None:
            self.health.set(ready)

    def not_ready(self) -> list[str]:
        """Why the route is not ready to serve (runtime/health.py), or nothing."""
        title = self.config.title
        problems = []
        if self._plane is None or self.port is None:
            problems.append(f"{title}: not listening")
        leaf = self.credentials.current().material.leaf
        now = datetime.datetime.now(datetime.timezone.utc)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            until = f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}"
            problems.append(f"{title}: its certificate is not valid now (valid until {until} UTC)")
        problem = self._probe.problem() if self._probe is not None else None
        if problem is not None:
            problems.append(f"{title}: {problem}")
        return problems

    def status(self) -> dict[str, object]:
        """What /status says of the route (runtime/admin.py): no key material."""
        config = self.config
        material = self.credentials.current().material
        leaf = material.leaf
        authorities = _authorities(material.ca_pem)
        earliest = min(ca.not_valid_after_utc for ca in authorities)
        return {
            "name": config.name,
            "mode": config.mode,
            "data_plane": config.data_plane,
            "listen": config.listen.target if config.listen.unix_path else
                      f"{config.listen.host}:{self.port}",
            "upstream": config.upstream.target,
            "certificate": {
                "subject": leaf.subject.rfc4514_string(),
                "serial": format(leaf.serial_number, "x"),
                "not_after": f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            },
            "ca_bundle": {
                "certificates": len(authorities),
                "earliest_not_after": f"{earliest:%Y-%m-%dT%H:%M:%SZ}",
            },
            "method_rules": len(config.allow.rules),
            "crls": len(self.crl.current.lists) if self.crl is not None else 0,
        }  # fmt: skip

    def expiries(self) -> list[tuple[str, float]]:
        """(own | ca, not-after as Unix time): the certificate in use, and its CA bundle's
        earliest."""
        material = self.credentials.current().material
        earliest = min(ca.not_valid_after_utc for ca in _authorities(material.ca_pem))
        return [
            ("own", material.leaf.not_valid_after_utc.timestamp()),
            ("ca", earliest.timestamp()),
        ]

    def _sources(self) -> tuple[PemSource | None, PemSource | None, PemSource | None]:
        return (self.config.cert, self.config.key, self.config.ca)

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, let in-flight calls finish for up to grace seconds, then cancel them."""
        self._expiry.stop()
        if self._probe is not None:
            self._probe.stop()
        if self.health is not None:
            self.health.close()  # NOT_SERVING while the drain lasts, and Watch calls end
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        self.credentials.close()
        if self._plane is not None:
            await self._plane.stop(grace)
        self.flush_calls(closing=True)  # the calls the drain ended, and any reported later

    def flush_calls(self, *, closing: bool = False) -> None:
        """Log and count now the calls that ended and wait in their batch (calls.Batched);
        closing: and each call as it ends from now on (the process is ending)."""
        for batched in self._batches:
            if closing:
                batched.close()
            else:
                batched.flush()


@functools.lru_cache(maxsize=8)
def _authorities(ca_pem: bytes) -> tuple[x509.Certificate, ...]:
    """The certificates of a CA bundle in use (checked when it was loaded), parsed once per
    bundle: /metrics and /status read them at every scrape."""
    return tuple(parse_certificates(ca_pem, "ca"))


def _describe_rules(rules: AllowRules) -> str:
    """The allowlist as the start-up line states it."""
    if rules.allow_all:
        return "allow-all: any certificate signed by the CA may call"
    parts = [f"{key.replace('_', '-')}={','.join(patterns)}" for key, patterns in rules.callers()]
    described = "allow " + " ".join(parts) if parts else ""
    if rules.rules:
        count = len(rules.rules)
        method_rules = f"{count} method rule{'' if count == 1 else 's'} (first match wins)"
        described = f"{described}, then {method_rules}" if described else method_rules
    return described


def _warn_shadowed(title: str, rules: AllowRules) -> None:
    """A WARNING per method rule that an earlier one makes dead (it never decides a call)."""
    for line in shadowed(rules.rules):
        logger.warning("%s: %s", title, line)
