"""The sidecar's configuration: one frozen value, validated when it is built.

Every rule about what a valid configuration is lives here, and every error
names the flag at fault. Files are read and checked later, by `tls`, when the
listener is built; this module checks what can be known without I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sidecar.addresses import Address
from sidecar.errors import ConfigError
from sidecar.logs import LogFormat
from sidecar.policy import AllowRules

Mode = Literal["ingress"]
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Config:
    """Everything one sidecar process needs to serve."""

    upstream: Address
    listen: Address
    cert: Path
    key: Path
    ca: Path
    allow: AllowRules = field(default_factory=AllowRules)
    mode: Mode = "ingress"
    unsafe_upstream: bool = False
    log_format: LogFormat = "text"
    log_level: str = "info"
    drain_grace: float = 10.0

    def __post_init__(self) -> None:
        if self.allow.empty and not self.allow.allow_all:
            raise ConfigError(
                "no allow rule: give --allow-cn, --allow-dns or --allow-uri, "
                "or --allow-all to accept any certificate signed by --ca"
            )
        if self.allow.allow_all and not self.allow.empty:
            raise ConfigError(
                "--allow-all cannot be combined with --allow-cn/--allow-dns/--allow-uri"
            )
        if not self.upstream.is_loopback and not self.unsafe_upstream:
            raise ConfigError(
                f"--upstream {self.upstream} is not on loopback: the hop to the upstream is "
                "plaintext; pass --unsafe-upstream to allow it"
            )
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"--log-level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        if self.drain_grace < 0:
            raise ConfigError(f"--drain-grace: {self.drain_grace:g} must not be negative")
