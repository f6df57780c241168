"""`sidecar certs`: make CAs and certificates, inspect and verify them, provision at build time.

A thin layer: sidecar.certs.build builds, sidecar.certs.files reads,
sidecar.certs.verify judges, sidecar.certs.provision holds the build-time rule.
This module parses flags, refuses to overwrite, writes files and prints one line
per result. Exit codes: 0 done (for verify: the certificate is good); 1 verify
judged the certificate bad; 2 usage or configuration error, one line on stderr,
no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from sidecar.certs import build as certs
from sidecar.certs.args import build_parser, is_dns_name
from sidecar.certs.files import (
    CA_CERT,
    CA_CHAIN,
    CA_KEY,
    Authority,
    load_authority,
    load_ca_dir,
    load_certificates,
)
from sidecar.certs.inspect import describe, key_description
from sidecar.certs.provision import decide, read_inputs
from sidecar.certs.verify import VerificationFailed, dn, utc, verify
from sidecar.config.pem import read_bytes
from sidecar.errors import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, ConfigError
from sidecar.pki.x509 import Role, pem_bundle, san_names

_FILE_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class UsageError(ConfigError):
    """A flag combination argparse cannot express; printed like argparse's own errors."""


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    if force:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} exists; give --force to overwrite it")


def _write(directory: Path, issued: certs.Issued, name: str, chain: bytes | None) -> list[Path]:
    """Write NAME.pem, NAME.key (0600) and, when a chain is given, NAME-chain.pem."""
    try:
        written = list(issued.write(directory, name))
        if chain is not None:
            chain_path = directory / f"{name}-chain.pem"
            chain_path.write_bytes(chain)
            written.append(chain_path)
    except OSError as exc:
        raise ConfigError(f"--out: cannot write into {directory}: {exc.strerror}") from None
    return written


def _file_base(name: str, flag: str) -> str:
    # Refused, not rewritten: a silently changed name could collide with, and then
    # overwrite, another certificate's files.
    if not _FILE_SAFE.fullmatch(name):
        hint = "" if flag == "--name" else "; give --name BASE for the file names"
        raise UsageError(
            f"{flag} {name!r} cannot name files (letters, digits, '.', '_', '-' only){hint}"
        )
    return name


def _summary(issued: certs.Issued) -> str:
    cert = issued.certificate
    names = ", ".join(san_names(cert))
    return (
        f"{dn(cert.subject)} [{names}], {key_description(issued.key)}, "
        f"valid until {utc(cert.not_valid_after_utc)}"
    )


def _init_ca(args: argparse.Namespace) -> int:
    if args.intermediate != (args.ca is not None):
        raise UsageError("--intermediate and --ca PARENT_DIR go together")
    parent = load_ca_dir(Path(args.ca)) if args.ca else None
    # The parent's path length caps the CAs below it (RFC 5280 4.2.1.9): refuse a
    # chain that verifiers would reject only later, at the first handshake.
    if parent is not None and parent.path_length == 0:
        raise ConfigError(f"--ca: {parent.cert_path} has path length 0: it signs leaves only")
    if parent is not None and parent.path_length is not None:
        below = 0 if args.path_length is None else args.path_length
        if below >= parent.path_length:
            raise ConfigError(
                f"--path-length {below}: must be below the parent's ({parent.path_length})"
            )
    out = Path(args.out)
    outputs = [out / CA_CERT, out / CA_KEY] + ([out / CA_CHAIN] if parent else [])
    _refuse_existing(outputs, args.force)
    name = args.name or ("sidecar Intermediate CA" if parent else "sidecar Root CA")
    ca = certs.init_ca(
        name,
        days=args.days,
        key_type=args.key_type,
        rsa_bits=args.rsa_bits,
        parent=parent.issued if parent else None,
        path_length="auto" if args.path_length is None else args.path_length,
    )
    # ca-chain.pem: what a leaf of this CA is served with, after the leaf itself.
    chain = pem_bundle([ca.certificate, *parent.intermediates]) if parent else None
    written = _write(out, ca, "ca", chain)
    signer = f" (signed by {dn(parent.certificate.subject)})" if parent else ""
    print(
        f"wrote {', '.join(map(str, written))}: {'intermediate' if parent else 'root'} CA "
        f"{dn(ca.certificate.subject)}{signer}, {key_description(ca.key)}, "
        f"valid until {utc(ca.certificate.not_valid_after_utc)}"
    )
    return EXIT_OK


def _issue_leaf(
    args: argparse.Namespace, authority: Authority, cn: str, usage: certs.Usage
) -> tuple[certs.Issued, list[Path]]:
    """Check the names and outputs, then sign and write the leaf; shared by issue and provision."""
    cn_as_dns = not args.no_cn_san
    if cn_as_dns and not is_dns_name(cn):
        raise UsageError(
            f"--cn {cn!r} is not a DNS name, so it cannot also be a DNS SAN; "
            "give --no-cn-san and a --dns, --ip or --uri SAN"
        )
    if not (cn_as_dns or args.dns or args.ip or args.uri):
        raise UsageError("the certificate would have no SAN: give --dns, --ip or --uri")
    base = _file_base(args.name, "--name") if args.name else _file_base(cn, "--cn")
    out = Path(args.out)
    outputs = [out / f"{base}.pem", out / f"{base}.key"]
    if not authority.is_root:
        outputs.append(out / f"{base}-chain.pem")
    _refuse_existing(outputs, args.force)
    issued = certs.issue(
        authority.issued,
        cn,
        usage=usage,
        dns=args.dns,
        ips=args.ip,
        uris=args.uri,
        days=args.days,
        key_type=args.key_type,
        rsa_bits=args.rsa_bits,
        cn_as_dns=cn_as_dns,
    )
    chain = (
        None if authority.is_root else pem_bundle([issued.certificate, *authority.intermediates])
    )
    return issued, _write(out, issued, base, chain)


def _issue(args: argparse.Namespace) -> int:
    authority = load_ca_dir(Path(args.ca))
    issued, written = _issue_leaf(args, authority, args.cn, args.usage)
    print(
        f"wrote {', '.join(map(str, written))}: {args.usage} certificate {_summary(issued)}, "
        f"signed by {dn(authority.certificate.subject)}"
    )
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    contents = [(name, read_bytes(Path(name), "FILE")) for name in args.files]
    now = datetime.datetime.now(datetime.timezone.utc)
    reports = ["\n".join(describe(data, name, now)) for name, data in contents]
    print("\n\n".join(reports))
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    if args.client and args.server_name is not None:
        raise UsageError("--client and --server-name exclude each other")
    roots = load_certificates(Path(args.ca), "--ca")
    chain = load_certificates(Path(args.cert), "CERT")
    purpose: Role = "client" if args.client else "server"
    try:
        result = verify(chain[0], chain[1:], roots, purpose=purpose, server_name=args.server_name)
    except VerificationFailed as exc:
        print(f"FAIL: {args.cert}: {exc}")
        return EXIT_REJECTED
    if args.server_name is not None:
        use = f"a server named {args.server_name}"
    elif purpose == "server":
        use = "a server (no name checked: give --server-name)"
    else:
        use = "a client"
    path = " <- ".join(dn(cert.subject) for cert in result.chain)
    until = min(cert.not_valid_after_utc for cert in result.chain)
    print(f"OK: {args.cert}: good for {use}; chain {path}; valid until {utc(until)}")
    return EXIT_OK


def _crl(args: argparse.Namespace) -> int:
    authority = load_ca_dir(Path(args.ca))
    ca = authority.certificate
    out = Path(args.out)
    now = datetime.datetime.now(datetime.timezone.utc)
    kept: list[x509.RevokedCertificate] = []
    number = 1
    earlier = _earlier_crl(out, authority, args.force)
    if earlier is not None:
        kept = list(earlier)
        with contextlib.suppress(x509.ExtensionNotFound):
            number = earlier.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    added = []
    for path in args.revoke:
        for certificate in load_certificates(Path(path), "--revoke")[:1]:  # the leaf
            if not _issued_by(certificate, ca):
                raise ConfigError(
                    f"--revoke: {path} was issued by {dn(certificate.issuer)}, not by "
                    f"{dn(ca.subject)}"
                )
            added.append(certificate.serial_number)
    added += args.serial
    revoked = dict.fromkeys(added, now)
    crl = certs.make_crl(
        authority.issued, revoked, number=number, days=args.days, kept=kept, now=now
    )
    try:
        out.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise ConfigError(f"--out: cannot write {out}: {exc.strerror}") from None
    serials = ", ".join(format(serial, "x") for serial in added) or "none"
    print(
        f"wrote {out}: CRL {number} of {dn(ca.subject)}, {len(crl)} revoked "
        f"(added: {serials}), next update {utc(crl.next_update_utc or now)}"
    )
    return EXIT_OK


def _issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ca's key signed certificate (its name alone could be another CA's)."""
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _earlier_crl(
    out: Path, authority: Authority, force: bool
) -> x509.CertificateRevocationList | None:
    """The CRL out holds, if it is one of this CA's (its entries are kept); anything else
    there is refused, unless force."""
    if not out.exists():
        return None
    data = read_bytes(out, "--out")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        crl = None
    ca = authority.certificate
    if crl is not None and crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        return crl
    if force:
        return None
    raise ConfigError(
        f"--out: {out} exists and is not a CRL of {dn(ca.subject)}; give --force to replace it"
    )


def _provision(args: argparse.Namespace) -> int:
    flags = {
        "--auth": args.auth,
        "--client-auth": args.client_auth,
        "--role": args.role,
        "--ca-cert": args.ca_cert,
        "--ca-key": args.ca_key,
        "--cn": args.cn,
    }
    inputs = read_inputs(flags, os.environ)
    issuance = decide(inputs.auth, inputs.client_auth, inputs.role)
    if not issuance.sign:
        print(f"not signing: {issuance.reason}")
        return EXIT_OK
    if inputs.cn is None:
        raise UsageError(f"signing ({issuance.reason}) needs --cn or COMMON_NAME")
    if inputs.ca_cert is None or inputs.ca_key is None:
        raise UsageError(f"signing ({issuance.reason}) needs --ca-cert FILE or CA_NAME")
    if args.out is None:
        raise UsageError(f"signing ({issuance.reason}) needs --out DIR")
    if not inputs.ca_cert.exists():
        raise ConfigError(f"{inputs.ca_cert_source}: no such file: {inputs.ca_cert}")
    authority = load_authority(inputs.ca_cert, inputs.ca_key, what="CA")
    issued, written = _issue_leaf(args, authority, inputs.cn, issuance.role)
    print(
        f"signed {issuance.role} certificate {_summary(issued)} ({issuance.reason}): "
        f"wrote {', '.join(map(str, written))}"
    )
    return EXIT_OK


_COMMANDS = {
    "init-ca": _init_ca,
    "issue": _issue,
    "inspect": _inspect,
    "verify": _verify,
    "crl": _crl,
    "provision": _provision,
}


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    prog = f"sidecar certs {args.command}"
    try:
        if getattr(args, "rsa_bits", None) is not None and args.key_type != "rsa":
            raise UsageError("--rsa-bits needs --key-type rsa")
        if hasattr(args, "key_type"):
            args.rsa_bits = args.rsa_bits or 2048
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"{prog}: usage error: {exc} (see {prog} --help)", file=sys.stderr)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE
