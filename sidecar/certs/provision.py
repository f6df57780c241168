"""The build-time issuance rule of `sidecar certs provision`: sign or not, and for what.

A container image is built for one role (server or client) with two switches,
AUTH (TLS at all) and CLIENT_AUTH (servers demand client certificates). The rule:

    sign iff AUTH and (CLIENT_AUTH or ROLE == server)

A server always needs a certificate once TLS is on; a client needs one only when
servers ask for it. The switches accept only the literals `true` and `false`:
a build argument spelt `True`, `yes` or left empty is a mistake in the build, and
guessing would silently ship an image without (or with) credentials.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar.errors import ConfigError
from sidecar.pki.x509 import Role

# Each flag, the environment variable that stands in for it, and (for help) what it is.
ENV_VARS = {
    "--auth": "AUTH",
    "--client-auth": "CLIENT_AUTH",
    "--role": "ROLE",
    "--ca-cert": "CA_NAME",
    "--ca-key": "CA_KEY",
    "--cn": "COMMON_NAME",
}
_CERT_SUFFIXES = (".pem", ".crt", ".cer")


@dataclass(frozen=True)
class Issuance:
    """What the rule decided: sign or not, for which role, and why."""

    sign: bool
    role: Role
    reason: str  # the settings that decided, as one phrase


@dataclass(frozen=True)
class Inputs:
    """The provision settings after flags and environment were merged and checked."""

    auth: bool
    client_auth: bool
    role: Role
    cn: str | None
    ca_cert: Path | None
    ca_key: Path | None
    ca_cert_source: str = "--ca-cert"  # for errors: the flag or `CA_NAME=...`


def decide(auth: bool, client_auth: bool, role: Role) -> Issuance:
    """Apply the rule; the reason names the switches that decided."""
    if not auth:
        return Issuance(False, role, "AUTH=false (no TLS, so no certificate)")
    if role == "server":
        return Issuance(True, role, "AUTH=true, ROLE=server")
    if client_auth:
        return Issuance(True, role, "AUTH=true, CLIENT_AUTH=true, ROLE=client")
    return Issuance(
        False,
        role,
        "CLIENT_AUTH=false, ROLE=client (servers will not ask for a client certificate)",
    )


def _pick(
    flags: Mapping[str, str | None], env: Mapping[str, str], flag: str
) -> tuple[str, str] | None:
    """(value, where it came from): the flag wins over the environment variable."""
    value = flags.get(flag)
    if value is not None:
        return value, flag
    var = ENV_VARS[flag]
    if var in env:
        return env[var], f"{var} (environment)"
    return None


def _switch(flags: Mapping[str, str | None], env: Mapping[str, str], flag: str) -> bool:
    found = _pick(flags, env, flag)
    if found is None:
        raise ConfigError(f"{flag} true|false is required (or set {ENV_VARS[flag]})")
    value, source = found
    if value not in ("true", "false"):
        raise ConfigError(f"{source} must be true or false, not {value!r}")
    return value == "true"


def ca_cert_path(ca_name: str) -> Path:
    """CA_NAME names the CA certificate file; without a .pem/.crt/.cer suffix, .pem is added."""
    path = Path(ca_name)
    return path if path.suffix in _CERT_SUFFIXES else Path(f"{ca_name}.pem")


def read_inputs(flags: Mapping[str, str | None], env: Mapping[str, str]) -> Inputs:
    """Merge flags (keyed by flag name) over the environment; raise ConfigError naming the source.

    The CA key defaults to the CA certificate's path with a .key suffix.
    """
    auth = _switch(flags, env, "--auth")
    client_auth = _switch(flags, env, "--client-auth")
    found = _pick(flags, env, "--role")
    if found is None:
        raise ConfigError(f"--role server|client is required (or set {ENV_VARS['--role']})")
    if found[0] not in ("server", "client"):
        raise ConfigError(f"{found[1]} must be server or client, not {found[0]!r}")
    role: Role = "server" if found[0] == "server" else "client"
    ca_cert, ca_cert_source = None, "--ca-cert"
    found = _pick(flags, env, "--ca-cert")
    if found is not None and found[0]:
        from_flag = found[1] == "--ca-cert"
        ca_cert = Path(found[0]) if from_flag else ca_cert_path(found[0])
        ca_cert_source = "--ca-cert" if from_flag else f"CA_NAME={found[0]}"
    found = _pick(flags, env, "--ca-key")
    ca_key = Path(found[0]) if found is not None and found[0] else None
    if ca_key is None and ca_cert is not None:
        ca_key = ca_cert.with_suffix(".key")
    found = _pick(flags, env, "--cn")
    cn = found[0] if found is not None and found[0] else None
    return Inputs(auth, client_auth, role, cn, ca_cert, ca_key, ca_cert_source)
