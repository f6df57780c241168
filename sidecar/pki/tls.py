"""Load and validate TLS material (certificate chain, private key, CA bundle) before serving.

Everything that can be wrong with a file is found here, at start-up, and reported
as a ConfigError naming the flag and the file: grpc core would otherwise accept
the bytes and fail later, per handshake, with nothing but "Socket closed" for
the client. What is loaded here becomes each data plane's credentials through
a route's CredentialSource (credentials.py): the spliced plane's SSL contexts,
grpc core's server and channel credentials.
"""

from __future__ import annotations

import _ssl
import contextlib
import ctypes
import datetime
import hashlib
import hmac
import os
import ssl
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sidecar.config.pem import PemSource
from sidecar.errors import ConfigError
from sidecar.pki.x509 import (
    ROLE_EKU,
    Role,
    eku_allows,
    eku_name,
    is_ca,
    parse_certificates,
    parse_private_key,
    pem_bundle,
    public_key_matches,
)


@dataclass(frozen=True)
class TLSMaterial:
    """Validated PEM bytes for one listener or client: own chain and key, trusted CAs."""

    cert_chain_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    leaf: x509.Certificate

    def __repr__(self) -> str:  # never let a private key reach a log line
        return f"TLSMaterial(leaf={self.leaf.subject.rfc4514_string()!r})"


PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def _where(source: PemSource) -> str:
    """How an error about source's contents begins: `--cert: app.pem`."""
    return f"{source.setting}: {source.origin}"


def _load_key(data: bytes, source: PemSource) -> PrivateKey:
    where = _where(source)
    key = parse_private_key(data, where)
    if not isinstance(key, PrivateKey):
        raise ConfigError(f"{where} holds an unsupported key type {type(key).__name__}")
    return key


def _check_validity(leaf: x509.Certificate, source: PemSource) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    where = f"{source.setting}: certificate {source.origin}"
    if leaf.not_valid_after_utc <= now:
        raise ConfigError(f"{where} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z")
    if leaf.not_valid_before_utc > now:
        raise ConfigError(
            f"{where} is not valid until {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z"
        )


def _check_usage(leaf: x509.Certificate, source: PemSource, role: Role) -> None:
    """A certificate restricted to other usages is refused by the peer at every handshake."""
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no EKU: any usage
    if not eku_allows(usages, role):
        name, peer = eku_name(ROLE_EKU[role]), "callers" if role == "server" else "the remote"
        raise ConfigError(
            f"{source.setting}: certificate {source.origin} lacks the {name} extended key "
            f"usage, so {peer} would refuse it (issue it with --{role} or --both)"
        )


def load_tls_material(cert: PemSource, key: PemSource, ca: PemSource, role: Role) -> TLSMaterial:
    """Read and check own chain, key and CA bundle; raise ConfigError naming the setting at fault.

    Checks: each source is readable; the certificate holds PEM certificates (leaf
    first, intermediates after); the key parses and is not encrypted; the key
    matches the leaf; the leaf is valid now and usable in its role (server for an
    ingress listener, client for an egress route); the CA bundle holds at least
    one CA certificate.
    """
    return check_tls_material(cert, key, ca, role, (cert.read(), key.read(), ca.read()))


def check_tls_material(
    cert: PemSource, key: PemSource, ca: PemSource, role: Role, contents: tuple[bytes, ...]
) -> TLSMaterial:
    """load_tls_material's checks on the sources' contents, read already (cert, key, CA)."""
    try:
        return _checked(cert, key, ca, role, contents)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as error:
        # cryptography parses extensions lazily: one it cannot read (two of a kind, a name
        # type it does not know) surfaces here, not when the PEM was parsed.
        raise ConfigError(
            f"{cert.setting} or {ca.setting}: a certificate whose extensions cannot be read "
            f"({error})"
        ) from None


def _checked(
    cert: PemSource, key: PemSource, ca: PemSource, role: Role, contents: tuple[bytes, ...]
) -> TLSMaterial:
    cert_pem, key_pem, ca_pem = contents

    chain = parse_certificates(cert_pem, _where(cert))
    leaf = chain[0]
    private_key = _load_key(key_pem, key)
    if not public_key_matches(leaf, private_key):
        raise ConfigError(
            f"{key.setting} does not match {cert.setting} "
            f"({key.origin} is not the key of {cert.origin})"
        )
    _check_validity(leaf, cert)
    _check_usage(leaf, cert, role)

    authorities = parse_certificates(ca_pem, _where(ca))
    if not any(is_ca(certificate) for certificate in authorities):
        raise ConfigError(
            f"{ca.setting}: {ca.origin} holds no CA certificate (none has BasicConstraints CA:TRUE)"
        )
    # grpc gets PEM re-encoded from what was parsed: cryptography reads PEM that
    # BoringSSL refuses (folded lines, indentation from a YAML value), and a
    # check that passes here must mean the handshake will load it.
    return TLSMaterial(
        cert_chain_pem=pem_bundle(chain),
        key_pem=private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        ca_pem=pem_bundle(authorities),
        leaf=leaf,
    )


def channel_credentials(material: TLSMaterial) -> grpc.ChannelCredentials:
    """Client credentials for an egress route: present own chain, trust only the CA bundle."""
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca_pem,
        private_key=material.key_pem,
        certificate_chain=material.cert_chain_pem,
    )


@contextlib.contextmanager
def _readable_path(data: bytes) -> Iterator[str]:
    """A path ssl can read data from (it only reads files), gone when the block ends.

    On Linux an anonymous in-memory file (memfd) that never touches a disk. Elsewhere
    (no memfd) a file readable by its owner only, in a private temporary directory,
    removed right after: a private key must never be readable by another user.
    """
    if sys.platform == "linux" and hasattr(os, "memfd_create"):
        descriptor = os.memfd_create("sidecar-tls", os.MFD_CLOEXEC)
        try:
            os.write(descriptor, data)
            yield f"/proc/self/fd/{descriptor}"
        finally:
            os.close(descriptor)
        return
    with tempfile.TemporaryDirectory(prefix="sidecar-tls-") as directory:  # mode 0700
        path = os.path.join(directory, "chain-and-key.pem")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        yield path


def load_own_chain(context: ssl.SSLContext, material: TLSMaterial) -> None:
    """Load material's chain and key into context, from memory (see _readable_path)."""
    with _readable_path(material.cert_chain_pem + b"\n" + material.key_pem) as path:
        context.load_cert_chain(path, path)


def _modern(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["h2"])
    return context


def server_ssl_context(material: TLSMaterial) -> ssl.SSLContext:
    """The spliced listener's TLS: own chain, a client certificate required and verified
    against the CA bundle, TLS 1.2 or later, ALPN h2."""
    context = _modern(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    load_own_chain(context, material)
    context.load_verify_locations(cadata=material.ca_pem.decode("ascii"))
    context.verify_mode = ssl.CERT_REQUIRED
    if _lone_leaf(material):
        build_own_chain_once(context)
    return context


def client_ssl_context(material: TLSMaterial) -> ssl.SSLContext:
    """An egress route's TLS to the remote: own chain as the client certificate, the
    remote's chain verified against the CA bundle and its name checked, ALPN h2."""
    context = _modern(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # verifies and checks the name
    load_own_chain(context, material)
    context.load_verify_locations(cadata=material.ca_pem.decode("ascii"))
    if _lone_leaf(material):
        build_own_chain_once(context)
    return context


def _lone_leaf(material: TLSMaterial) -> bool:
    """The chain file holds the leaf alone (with intermediates, OpenSSL sends the file's
    chain as it is, and builds nothing per handshake)."""
    return material.cert_chain_pem.count(b"-----BEGIN CERTIFICATE-----") == 1


# What a peer's certificate chain may weigh, per certificate allowed by max_chain_length
# (16 KiB at least): real certificates weigh 0.5-2 KiB (RSA-4096 with a few SANs is under
# 2 KiB). OpenSSL parses every certificate of the chain before it verifies any (OpenSSL
# 3.0: about 0.35 ms for a small one, so a chain's cost is mostly its count), and a depth
# limit counts only the certificates that chain, not junk appended: the size is what
# bounds the work a caller's chain costs the event loop (20 KiB: about 14 ms of junk).
CERTIFICATE_BYTES = 2048
_MIN_CHAIN_BYTES = 16 * 1024
_SSL_CTRL_SET_MAX_CERT_LIST = 51


def max_chain_bytes(max_chain_length: int) -> int:
    """The size of certificate chain accepted from a peer allowed max_chain_length of them."""
    return max(max_chain_length * CERTIFICATE_BYTES, _MIN_CHAIN_BYTES)


def _libssl() -> ctypes.CDLL:
    """The libssl the ssl module itself uses (its symbols resolve through _ssl's own
    dependencies, so a second OpenSSL on the system cannot be picked up instead)."""
    library = ctypes.CDLL(_ssl.__file__)
    library.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    library.SSL_CTX_get_options.restype = ctypes.c_uint64
    library.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    library.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    library.SSL_CTX_set_verify_depth.argtypes = [ctypes.c_void_p, ctypes.c_int]
    library.SSL_CTX_set_verify_depth.restype = None
    library.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    library.SSL_CTX_ctrl.restype = ctypes.c_long
    library.ERR_clear_error.argtypes = []
    library.ERR_clear_error.restype = None
    return library


_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


def _openssl_context(context: ssl.SSLContext) -> tuple[ctypes.CDLL, int] | str:
    """libssl and the context's SSL_CTX, for what Python's ssl does not expose; else why not.

    CPython keeps the SSL_CTX pointer as the first field after the object header. It is
    checked (the options and verify mode OpenSSL reports for it must be the context's)
    before anything is written through it.
    """
    try:
        library = _libssl()
        address = id(context) + object.__basicsize__  # past PyObject_HEAD: SSL_CTX *ctx
        pointer = ctypes.c_void_p.from_address(address).value
        if not pointer:
            return "the ssl module's SSL_CTX was not found"
        if library.SSL_CTX_get_options(pointer) != context.options or (
            library.SSL_CTX_get_verify_mode(pointer) != _VERIFY_MODES[context.verify_mode]
        ):
            return "the ssl module's SSL_CTX was not found where expected"
    except (OSError, AttributeError, ValueError) as error:  # no such symbol, say
        return f"libssl is not reachable ({error})"
    return library, pointer


def cap_peer_chain(context: ssl.SSLContext, max_chain_length: int) -> str | None:
    """Refuse, in OpenSSL itself, a peer chain longer than max_chain_length certificates
    (leaf included, root not counted) or heavier than max_chain_bytes; None once done,
    else why it could not be (Python's ssl exposes neither SSL_CTX_set_verify_depth nor
    SSL_CTX_set_max_cert_list)."""
    found = _openssl_context(context)
    if isinstance(found, str):
        return found
    library, pointer = found
    # OpenSSL's depth counts neither the leaf nor the trust anchor.
    library.SSL_CTX_set_verify_depth(pointer, max(max_chain_length - 1, 0))
    library.SSL_CTX_ctrl(
        pointer, _SSL_CTRL_SET_MAX_CERT_LIST, max_chain_bytes(max_chain_length), None
    )
    return None


_SSL_CTRL_MODE = 33
_SSL_MODE_NO_AUTO_CHAIN = 0x8
_SSL_CTRL_BUILD_CERT_CHAIN = 105
# The root is not sent (the peer has it, or it would not trust it); a leaf whose issuers
# the bundle lacks (an own CA other than the peers') is sent as far as its chain goes.
_BUILD_CHAIN_FLAGS = 0x2 | 0x8 | 0x10  # NO_ROOT | IGNORE_ERROR | CLEAR_ERROR


def build_own_chain_once(context: ssl.SSLContext) -> None:
    """Complete a lone leaf's chain from the CA bundle once, now, not at every handshake.

    Given a certificate file with the leaf alone, OpenSSL looks for its issuers in the
    trust store and verifies them for every handshake (measured under `openssl s_time`:
    0.1-0.2 ms of a 1.5 ms handshake), and sends the root along with them. Built once
    here, with that per-handshake search turned off, every handshake sends the same chain,
    root left out. Should the build fail, or Python's SSL_CTX not be reachable, OpenSSL's
    own behaviour stays: slower, as correct.
    """
    found = _openssl_context(context)
    if isinstance(found, str):
        return
    library, pointer = found
    if library.SSL_CTX_ctrl(pointer, _SSL_CTRL_BUILD_CERT_CHAIN, _BUILD_CHAIN_FLAGS, None) > 0:
        library.SSL_CTX_ctrl(pointer, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)
    else:
        library.ERR_clear_error()  # the queue is per thread: leave nothing for the next call


# A supervisor's workers share the secret their session ticket keys derive from
# (runtime/worker.py); a lone process leaves OpenSSL its own random keys per context.
_ticket_secret: bytes | None = None
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
_TICKET_KEYS_LENGTH = 80  # OpenSSL 3: key name 16 bytes, HMAC key 32, AES key 32
TICKET_SECRET_LENGTH = 32


def share_session_tickets(secret: bytes) -> None:
    """Encrypt TLS session tickets with keys derived from secret in every listener context
    prepared from now on (share_ticket_keys), so that processes given the same secret resume
    each other's sessions."""
    global _ticket_secret
    _ticket_secret = secret


def share_ticket_keys(context: ssl.SSLContext, material: TLSMaterial, scope: str) -> bool:
    """Give a listener's context the keys shared with the other workers, if there are any;
    True once done.

    The keys derive from the route (scope: a ticket of one route does not resume on another,
    whose budgets may be stricter) and from its credentials (certificate chain, key and CA
    bundle), so a reload that changes them invalidates every ticket issued before, as a
    context of its own would: a caller whose CA was removed from the bundle cannot resume
    around the change.
    """
    secret = _ticket_secret
    if secret is None:
        return False
    found = _openssl_context(context)
    if isinstance(found, str):
        return False  # each process keeps keys of its own: resumption on the same worker
    library, pointer = found
    credentials = hashlib.sha256(
        b"\0".join((scope.encode(), material.cert_chain_pem, material.key_pem, material.ca_pem))
    ).digest()
    keys = b"".join(
        hmac.new(secret, f"session ticket keys {part}".encode() + credentials, "sha512").digest()
        for part in (1, 2)
    )[:_TICKET_KEYS_LENGTH]
    buffer = ctypes.create_string_buffer(keys, len(keys))
    done: int = library.SSL_CTX_ctrl(
        pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(keys), ctypes.cast(buffer, ctypes.c_void_p)
    )
    if done <= 0:
        library.ERR_clear_error()
    return done > 0


_SSL_CTRL_SET_READ_AHEAD = 41


def read_ahead(context: ssl.SSLContext) -> bool:
    """Let OpenSSL read as much as the socket holds (up to a record buffer) in one system
    call, not each record's header and then its body (two calls a record, a third to find
    the socket empty): for connections whose TLS runs on the socket itself
    (splice/tls_transport.py). True once set."""
    found = _openssl_context(context)
    if isinstance(found, str):
        return False
    library, pointer = found
    library.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    return True
