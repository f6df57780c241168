"""Parse HOST:PORT addresses and decide whether one stays on this machine."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sidecar.errors import ConfigError


@dataclass(frozen=True)
class Address:
    """A TCP address (host, port) or a unix socket path, as grpc targets spell them."""

    host: str
    port: int
    unix_path: str | None = None

    @property
    def target(self) -> str:
        """The string grpc channels and servers take."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.target

    @property
    def is_loopback(self) -> bool:
        """True when traffic to this address cannot leave the machine."""
        if self.unix_path is not None:
            return True
        host = self.host.lower().rstrip(".")
        if host == "localhost" or host.endswith(".localhost"):
            return True  # RFC 6761: localhost names resolve to loopback only
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_address(text: str, flag: str, *, allow_unix: bool = False) -> Address:
    """Parse `host:port`, `[v6]:port` or (when allowed) `unix:/path`; errors name the flag."""
    if allow_unix and text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"{flag}: empty unix socket path in {text!r}")
        return Address(host="", port=0, unix_path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{flag}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{flag}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(
            f"{flag}: write IPv6 addresses in brackets, e.g. [::1]:8443, not {text!r}"
        )
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{flag}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{flag}: port {port} is out of range 0-65535")
    return Address(host=host, port=port)
