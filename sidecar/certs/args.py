"""The flags of `sidecar certs` and their help: the one place each option is defined.

Values are checked as they are parsed (days positive, DNS names, IPs, URIs), so a
bad one is a one-line usage error naming the flag before anything is made.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from typing import NoReturn

from sidecar.errors import EXIT_USAGE

_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]+")  # a scheme, then printable ASCII

_DESCRIPTION = """\
Make a CA (root or intermediate), issue server and client certificates, inspect
and verify certificates, and issue a container's certificate at build time.

  sidecar certs init-ca --out ca --name "Example Root CA"
  sidecar certs issue --ca ca --cn app --server --out certs
  sidecar certs verify --ca ca/ca.pem certs/app.pem --server-name app
  sidecar certs crl --ca ca --revoke certs/app.pem --out ca/ca.crl
"""

_EPILOG = """\
Certificates: EC P-256 keys (RSA on request), random serials, critical
BasicConstraints and KeyUsage, SKI/AKI, serverAuth/clientAuth EKU, SANs always.
Key files are written mode 0600. Existing output is never overwritten without --force.
exit codes: 0 done; 1 verify: the certificate is not good; 2 usage or configuration error.
"""

_CA_FILES = """\
writes DIR/ca.pem and DIR/ca.key; an intermediate also gets DIR/ca-chain.pem
(itself, then any CAs above it but not the root), which `issue` appends to the
chains of the leaves it signs.
"""

_ISSUE_FILES = """\
writes OUT/NAME.pem and OUT/NAME.key (0600), NAME being --name or else the CN;
a CN with characters other than letters, digits, '.', '_' and '-' is refused
(give --name). When the CA is an intermediate, OUT/NAME-chain.pem holds the
leaf then the intermediates (not the root): serve that one.
The CN is also written as a DNS SAN unless --no-cn-san.
"""

_CRL = """\
writes OUT, the CA's CRL (PEM), listing the certificates given by --revoke and
--serial, and those OUT already lists when it is a CRL of this CA (so that each run
adds to it; its CRL number goes up by one). A sidecar route reads it with `crl:`
(and again at SIGHUP or reload_interval). Past --days, the CRL is stale: make a
new one before then (run the command with nothing to revoke to renew it).
"""

_PROVISION = """\
Issue this container's certificate at image build time, by the rule
  sign iff AUTH and (CLIENT_AUTH or ROLE == server)
Each flag may come from an environment variable instead (the flag wins):
  --auth AUTH, --client-auth CLIENT_AUTH, --role ROLE, --cn COMMON_NAME,
  --ca-cert CA_NAME, --ca-key CA_KEY.
AUTH and CLIENT_AUTH must be exactly `true` or `false`. CA_NAME names the CA
certificate file, `.pem` added when it has no .pem/.crt/.cer suffix (CA_NAME=ca
means ca.pem); the CA key defaults to that path with a .key suffix. When not
signing, no CA, CN or --out is needed. Prints one line: what it signed, or why not.
A server gets serverAuth, a client clientAuth; the CN is also a DNS SAN.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the flag, instead of argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: usage error: {message} (see {self.prog} --help)\n")


def is_dns_name(name: str) -> bool:
    """A host name (letters, digits, hyphens; dotted labels), optionally *. wildcard."""
    return len(name) <= 253 and _DNS_NAME.fullmatch(name) is not None


def _days(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of days >= 1, not {text!r}")
    return int(text)


def _serial(text: str) -> int:
    digits = text.strip().lower().removeprefix("serial=").replace(":", "")
    try:
        return int(digits, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hexadecimal serial") from None


def _path_length(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return int(text)


def _dns(text: str) -> str:
    if not is_dns_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a DNS name")
    return text


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _uri(text: str) -> str:
    if not _URI.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a URI (scheme:..., ASCII)")
    return text


def _key_options(parser: argparse.ArgumentParser, days: int) -> None:
    parser.add_argument(
        "--days",
        type=_days,
        default=days,
        help="lifetime (default: %(default)s; never past the CA's)",
    )
    parser.add_argument(
        "--key-type", choices=["ec", "rsa"], default="ec", help="EC P-256 or RSA (default: ec)"
    )
    parser.add_argument(
        "--rsa-bits",
        type=int,
        choices=[2048, 3072, 4096],
        help="RSA key size, with --key-type rsa (default: 2048)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")


def _leaf_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dns", action="append", type=_dns, default=[], help="DNS SAN (repeatable)"
    )
    parser.add_argument("--ip", action="append", type=_ip, default=[], help="IP SAN (repeatable)")
    parser.add_argument(
        "--uri",
        action="append",
        type=_uri,
        default=[],
        help="URI SAN, e.g. spiffe://... (repeatable)",
    )
    parser.add_argument(
        "--no-cn-san", action="store_true", help="do not also write the CN as a DNS SAN"
    )
    parser.add_argument("--name", metavar="BASE", help="base name of the output files")
    _key_options(parser, days=365)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sidecar certs",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    init_ca = commands.add_parser(
        "init-ca", help="make a root or intermediate CA", description=_CA_FILES, formatter_class=raw
    )
    init_ca.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    init_ca.add_argument("--name", help="the CA's CN (default: sidecar Root/Intermediate CA)")
    init_ca.add_argument(
        "--intermediate", action="store_true", help="make an intermediate CA signed by --ca"
    )
    init_ca.add_argument(
        "--ca", metavar="PARENT_DIR", help="the parent CA's directory (init-ca --out)"
    )
    init_ca.add_argument(
        "--path-length",
        type=_path_length,
        metavar="N",
        help="how many CAs may follow this one in a chain "
        "(default: unlimited for a root, 0 for an intermediate)",
    )
    _key_options(init_ca, days=3650)

    issue = commands.add_parser(
        "issue",
        help="issue a server or client certificate",
        description=_ISSUE_FILES,
        formatter_class=raw,
    )
    issue.add_argument(
        "--ca", required=True, metavar="DIR", help="the CA's directory (init-ca --out)"
    )
    issue.add_argument("--cn", required=True, metavar="NAME", help="subject common name")
    usage = issue.add_mutually_exclusive_group(required=True)
    usage.add_argument(
        "--server", dest="usage", action="store_const", const="server", help="serverAuth"
    )
    usage.add_argument(
        "--client", dest="usage", action="store_const", const="client", help="clientAuth"
    )
    usage.add_argument("--both", dest="usage", action="store_const", const="both", help="both EKUs")
    issue.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    _leaf_options(issue)

    inspect = commands.add_parser(
        "inspect",
        help="describe certificates (and keys, without their secret) in PEM files",
        description="Print subject, SANs, issuer, serial, validity, CA or leaf, key, usages "
        "and SHA-256 fingerprint of every certificate in each FILE. A private key is "
        "described by its type and public-key fingerprint only.",
    )
    inspect.add_argument("files", nargs="+", metavar="FILE")

    verify = commands.add_parser(
        "verify",
        help="check a certificate against a CA bundle",
        description="Check CERT (leaf, then any intermediates) against the CA bundle: chain, "
        "validity, EKU (serverAuth, or clientAuth with --client) and the name. Prints "
        "'OK: ...' and exits 0, or 'FAIL: <reason>' and exits 1; exit 2 for usage errors "
        "and unreadable files.",
    )
    verify.add_argument("--ca", required=True, metavar="CA.pem", help="trusted CA certificates")
    verify.add_argument("cert", metavar="CERT.pem")
    verify.add_argument("--server-name", metavar="NAME", help="DNS name or IP a client would dial")
    verify.add_argument("--client", action="store_true", help="check as a client certificate")

    crl = commands.add_parser(
        "crl", help="make or update a CA's certificate revocation list", description=_CRL,
        formatter_class=raw,
    )  # fmt: skip
    crl.add_argument(
        "--ca", required=True, metavar="DIR", help="the CA's directory (init-ca --out)"
    )
    crl.add_argument("--out", required=True, metavar="FILE", help="the CRL file (PEM)")
    crl.add_argument("--revoke", action="append", default=[], metavar="CERT.pem",
                     help="a certificate of this CA to revoke (repeatable)")  # fmt: skip
    crl.add_argument("--serial", action="append", default=[], type=_serial, metavar="HEX",
                     help="a serial to revoke, hex as `openssl x509 -serial` prints it "
                     "(repeatable)")  # fmt: skip
    crl.add_argument("--days", type=_days, default=7, help="until the next update (default 7)")
    crl.add_argument("--force", action="store_true",
                     help="replace OUT even when it is not a CRL of this CA")  # fmt: skip

    provision = commands.add_parser(
        "provision",
        help="build-time issuance by AUTH/CLIENT_AUTH/ROLE",
        description=_PROVISION,
        formatter_class=raw,
    )
    provision.add_argument("--auth", metavar="true|false", help="TLS on at all (env AUTH)")
    provision.add_argument(
        "--client-auth",
        metavar="true|false",
        help="servers demand client certificates (env CLIENT_AUTH)",
    )
    provision.add_argument(
        "--role", metavar="server|client", help="what this container is (env ROLE)"
    )
    provision.add_argument("--ca-cert", metavar="FILE", help="CA certificate (env CA_NAME)")
    provision.add_argument(
        "--ca-key", metavar="FILE", help="CA key (env CA_KEY; default: beside --ca-cert)"
    )
    provision.add_argument("--cn", metavar="NAME", help="subject CN and DNS SAN (env COMMON_NAME)")
    provision.add_argument("--out", metavar="DIR", help="directory to write into (when signing)")
    _leaf_options(provision)
    return parser
