"""Where a route's own certificate, key and CA bundle come from, and how they are swapped.

A `CredentialSource` reads the route's PEM sources (files or inline text),
checks them (tls.load_tls_material: every fault a ConfigError naming the
setting) and holds the result as one immutable `Credentials` snapshot. Every
handshake reads `current()`, an attribute read, never a file: the splice's
listener per caller (or, egress, per upstream connection), grpc core through its
dynamic server credentials (`grpc_server_credentials`), which it asks before
each handshake on a core thread. `reload()` reads and checks afresh and swaps
the snapshot in one assignment, or raises ConfigError and keeps the last good
one: what a reload trigger needs (as ghostunnel's certloader). The other source,
pki/spiffe.py, is pushed its credentials by a SPIFFE Workload API; both are a
`SwappedCredentials` to the data planes.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import grpc

from sidecar.config.pem import PemSource
from sidecar.errors import ConfigError
from sidecar.pki.tls import (
    TLSMaterial,
    channel_credentials,
    check_tls_material,
    client_ssl_context,
    server_ssl_context,
)
from sidecar.pki.x509 import Role


@dataclass(frozen=True)
class Credentials:
    """One checked set of a route's TLS material, and what each data plane makes of it
    (each made once, when first asked for)."""

    material: TLSMaterial
    role: Role

    @classmethod
    def checked(cls, material: TLSMaterial, role: Role, cert: PemSource) -> Credentials:
        """Credentials OpenSSL takes: its SSL context is made now, so that material it
        refuses (a key too small for its security level, say) is a ConfigError naming the
        setting, at start-up or at a reload, never a listener whose every handshake fails."""
        credentials = cls(material, role)
        try:
            _ = credentials.ssl_context
        except ssl.SSLError as error:
            reason = str(error).split(" (_ssl.c:")[0]
            raise ConfigError(f"{cert.setting}: OpenSSL refuses {cert.origin}: {reason}") from None
        return credentials

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        """The spliced plane's: a listener's (server), or an egress route's to its remote."""
        if self.role == "server":
            return server_ssl_context(self.material)
        return client_ssl_context(self.material)

    @cached_property
    def grpc_server_configuration(self) -> grpc.ServerCertificateConfiguration:
        material = self.material
        return grpc.ssl_server_certificate_configuration(
            [(material.key_pem, material.cert_chain_pem)], root_certificates=material.ca_pem
        )

    @cached_property
    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.material)


class SwappedCredentials:
    """What every credential source is to the data planes: `current()` for each handshake,
    swapped in one assignment (`_swap`), and grpc core's dynamic server credentials that
    follow the swaps. on_change, set by the route, is told after each swap made by the
    source on its own (an agent's push; a reload() reports its swap by its result)."""

    role: Role
    _current: Credentials
    _served: Credentials | None = None  # what grpc core was last handed
    on_change: Callable[[], None] | None = None

    def current(self) -> Credentials:
        return self._current

    def changed(self, sources: tuple[PemSource, PemSource, PemSource] | None = None) -> bool:
        """Whether a reload would find something new (a periodic check asks first)."""
        return False

    def reload(self, sources: tuple[PemSource, PemSource, PemSource] | None = None) -> bool:
        """Read the credentials again and say whether they changed (ConfigError: kept)."""
        return False

    def watch(self) -> None:
        """Start following the source's own updates (in the running loop)."""

    def close(self) -> None:
        """Stop following them."""

    def _swap(self, loaded: Credentials) -> bool:
        """Serve loaded from the next handshake on, if it differs; whether it did."""
        if loaded.material == self._current.material:
            return False
        if self._served is not None:  # the grpc plane's: built here, not on grpc's thread
            _ = loaded.grpc_server_configuration
        self._current = loaded
        return True

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        """The grpc plane's listener credentials: a client certificate required and verified
        on every connection, new handshakes getting whatever is current."""
        self._served = self._current
        return grpc.dynamic_ssl_server_credentials(
            self._current.grpc_server_configuration,
            self._fetch,
            require_client_authentication=True,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc core's question before each handshake (on a core thread): None keeps what it
        has. Cheap and file-free: the configuration was built when the swap was made."""
        current = self._current
        if current is self._served:
            return None
        self._served = current
        return current.grpc_server_configuration


class CredentialSource(SwappedCredentials):
    """A route's credentials from PEM files or text: `reload()` reads and swaps them."""

    def __init__(self, cert: PemSource, key: PemSource, ca: PemSource, role: Role) -> None:
        self._sources = (cert, key, ca)
        self.role = role
        # What the sources held when last read and checked: a read that finds the same
        # bytes has nothing to check again.
        self._contents = self._read()
        # A ConfigError here stops the start-up.
        material = check_tls_material(cert, key, ca, role, self._contents)
        self._current = Credentials.checked(material, role, cert)
        # What the last reload refused (the contents, or why they could not be read), so
        # that a periodic check reports a fault once, not at every check.
        self._refused: tuple[bytes, ...] | str | None = None

    def _read(self) -> tuple[bytes, ...]:
        return tuple(source.read() for source in self._sources)

    def changed(self, sources: tuple[PemSource, PemSource, PemSource] | None = None) -> bool:
        """Whether the sources (or new ones) hold something new: neither what is in use nor
        what the last reload refused (for a periodic check: reading the files is cheap,
        checking them is not). A file that cannot be read is new the first time, so that
        reload() says why."""
        sources = sources or self._sources
        try:
            contents: tuple[bytes, ...] | str = tuple(source.read() for source in sources)
        except ConfigError as error:
            contents = str(error)
        if contents == self._refused:
            return False
        return sources != self._sources or contents != self._contents

    def reload(self, sources: tuple[PemSource, PemSource, PemSource] | None = None) -> bool:
        """Read and check the sources again (or new ones: cert, key, ca, from a reloaded
        configuration); swap in the result if it differs from the current one, and say
        whether it did. Raises ConfigError, keeping the current credentials and sources,
        when anything is wrong."""
        sources = sources or self._sources
        try:
            contents = tuple(source.read() for source in sources)
        except ConfigError as error:
            self._refused = str(error)
            raise
        if contents == self._contents and sources == self._sources:
            return False
        try:
            material = check_tls_material(*sources, self.role, contents)
            loaded = Credentials.checked(material, self.role, sources[0])
        except ConfigError:
            self._refused = contents
            raise
        self._sources, self._contents, self._refused = sources, contents, None
        return self._swap(loaded)
