"""`sidecar certs` as a user runs it: a real process, its files judged by openssl."""

from __future__ import annotations

import datetime
import os
import re
import ssl
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar import certs
from sidecar.certs.files import load_ca_dir
from tests.conftest import ROOT

# Variables `provision` reads: a developer's shell must not leak them into a test.
_PROVISION_ENV = ("AUTH", "CLIENT_AUTH", "ROLE", "CA_NAME", "CA_KEY", "COMMON_NAME")


def certs_cmd(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in _PROVISION_ENV}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "certs", *map(str, args)],
        cwd=ROOT,
        env={**base, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(*args: str | Path, env: dict[str, str] | None = None) -> str:
    result = certs_cmd(*args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """Assert the command failed with `code` and exactly one line on stderr; return it."""
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def openssl_text(cert: Path) -> str:
    result = openssl("x509", "-in", cert, "-noout", "-text")
    assert result.returncode == 0, result.stderr
    return result.stdout


def openssl_verifies(
    ca: Path, cert: Path, *, purpose: str | None = None, chain: Path | None = None
) -> bool:
    args: list[str | Path] = ["verify", "-CAfile", ca]
    if chain is not None:
        args += ["-untrusted", chain]
    if purpose is not None:
        args += ["-purpose", purpose]
    return openssl(*args, cert).returncode == 0


def fingerprint(cert: Path) -> str:
    out = openssl("x509", "-in", cert, "-noout", "-fingerprint", "-sha256").stdout
    return out.strip().split("=", 1)[1]


@dataclass(frozen=True)
class Made:
    """A PKI made once by the command: a root, an intermediate and leaves of each usage."""

    dir: Path
    root: Path
    inter: Path
    out: Path

    def cert(self, name: str) -> Path:
        return self.out / f"{name}.pem"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    base = tmp_path_factory.mktemp("certs-cli")
    root, inter, out = base / "root", base / "inter", base / "out"
    ok("init-ca", "--out", root, "--name", "Example Root CA")
    ok("init-ca", "--out", inter, "--intermediate", "--ca", root, "--name", "Example Issuing CA")
    sans = ["--dns", "app.internal", "--ip", "127.0.0.1"]
    ok("issue", "--ca", root, "--cn", "app", "--server", *sans, "--out", out)
    ok("issue", "--ca", root, "--cn", "alice", "--client", "--out", out)
    ok("issue", "--ca", root, "--cn", "both", "--both", "--out", out)
    ok("issue", "--ca", inter, "--cn", "deep", "--server", "--out", out)
    return Made(base, root, inter, out)


@pytest.mark.parametrize(
    ("name", "server", "client"),
    [("app", True, False), ("alice", False, True), ("both", True, True)],
)
def test_issued_certificates_verify_with_openssl_for_their_usage_only(
    made: Made, name: str, server: bool, client: bool
) -> None:
    ca = made.root / "ca.pem"
    assert openssl_verifies(ca, made.cert(name))
    assert openssl_verifies(ca, made.cert(name), purpose="sslserver") is server
    assert openssl_verifies(ca, made.cert(name), purpose="sslclient") is client


def test_leaf_of_intermediate_verifies_with_its_chain_file(made: Made) -> None:
    ca, leaf, chain = made.root / "ca.pem", made.cert("deep"), made.out / "deep-chain.pem"
    assert openssl_verifies(ca, leaf, chain=chain, purpose="sslserver")
    assert not openssl_verifies(ca, leaf)  # the intermediate is needed, not optional
    blocks = chain.read_text().count("BEGIN CERTIFICATE")
    assert blocks == 2  # leaf, intermediate; never the root
    assert chain.read_text().startswith(leaf.read_text())
    assert (made.inter / "ca-chain.pem").read_text() == (made.inter / "ca.pem").read_text()
    assert "pathlen:0" in openssl_text(made.inter / "ca.pem")


def test_certificates_carry_critical_constraints_key_ids_sans_and_p256(made: Made) -> None:
    root, leaf = openssl_text(made.root / "ca.pem"), openssl_text(made.cert("app"))
    assert re.search(r"Basic Constraints: critical\s+CA:TRUE", root)
    assert re.search(r"Key Usage: critical\s+Digital Signature, Certificate Sign, CRL Sign", root)
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", leaf)
    assert re.search(r"Key Usage: critical\s+Digital Signature\n", leaf)
    assert re.search(r"Extended Key Usage: \s+TLS Web Server Authentication\n", leaf)
    assert "DNS:app, DNS:app.internal, IP Address:127.0.0.1" in leaf
    assert "NIST CURVE: P-256" in leaf
    root_ski = re.search(r"Subject Key Identifier: \s+(\S+)", root)
    leaf_aki = re.search(r"Authority Key Identifier: \s+(?:keyid:)?(\S+)", leaf)
    assert root_ski and leaf_aki and root_ski.group(1) == leaf_aki.group(1)
    client = openssl_text(made.cert("alice"))
    assert "TLS Web Client Authentication" in client and "DNS:alice" in client


def test_serials_are_random_and_distinct(made: Made) -> None:
    serials = {
        int(openssl("x509", "-in", made.cert(n), "-noout", "-serial").stdout.split("=")[1], 16)
        for n in ("app", "alice", "both", "deep")
    }
    assert len(serials) == 4
    assert all(serial.bit_length() > 64 for serial in serials)


def test_key_files_are_readable_by_owner_only(made: Made) -> None:
    keys = [*made.out.glob("*.key"), made.root / "ca.key", made.inter / "ca.key"]
    assert len(keys) == 6
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_issue_refuses_to_overwrite_without_force_and_overwrites_with_it(
    made: Made, tmp_path: Path
) -> None:
    args = ["issue", "--ca", made.root, "--cn", "svc", "--server", "--out", tmp_path]
    ok(*args)
    before = (tmp_path / "svc.pem").read_bytes()
    line = one_line_error(certs_cmd(*args))
    assert str(tmp_path / "svc.pem") in line and "--force" in line
    assert (tmp_path / "svc.pem").read_bytes() == before
    ok(*args, "--force")
    assert (tmp_path / "svc.pem").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "svc.key").stat().st_mode) == 0o600


def test_init_ca_refuses_to_overwrite_a_ca_without_force(made: Made) -> None:
    before = (made.root / "ca.key").read_bytes()
    line = one_line_error(certs_cmd("init-ca", "--out", made.root))
    assert "ca.pem exists" in line
    assert (made.root / "ca.key").read_bytes() == before


def test_rsa_keys_on_request(made: Made, tmp_path: Path) -> None:
    ok("issue", "--ca", made.root, "--cn", "r", "--both", "--key-type", "rsa", "--out", tmp_path)
    text = openssl_text(tmp_path / "r.pem")
    assert "Public-Key: (2048 bit)" in text
    assert "Digital Signature, Key Encipherment" in text
    assert openssl_verifies(made.root / "ca.pem", tmp_path / "r.pem", purpose="sslserver")
    ok("init-ca", "--out", tmp_path / "ca", "--key-type", "rsa", "--rsa-bits", "3072")
    assert "Public-Key: (3072 bit)" in openssl_text(tmp_path / "ca" / "ca.pem")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["issue", "--ca", "{root}", "--cn", "x", "--out", "{tmp}"], "--server --client --both"),
        (
            ["issue", "--ca", "{root}", "--cn", "x", "--server", "--client", "--out", "{tmp}"],
            "not allowed with",
        ),
        (
            ["issue", "--ca", "{root}", "--cn", "x", "--server", "--days", "0", "--out", "{tmp}"],
            "--days",
        ),
        (
            ["issue", "--ca", "{root}", "--cn", "x", "--server", "--dns", "a b", "--out", "{tmp}"],
            "not a DNS name",
        ),
        (
            ["issue", "--ca", "{root}", "--cn", "x", "--server", "--ip", "1.2.3", "--out", "{tmp}"],
            "not an IP address",
        ),
        (
            [
                "issue",
                "--ca",
                "{root}",
                "--cn",
                "x",
                "--client",
                "--rsa-bits",
                "3072",
                "--out",
                "{tmp}",
            ],
            "--rsa-bits needs --key-type rsa",
        ),
        (
            [
                "issue",
                "--ca",
                "{root}",
                "--cn",
                "a/b",
                "--no-cn-san",
                "--dns",
                "b",
                "--server",
                "--out",
                "{tmp}",
            ],
            "give --name",
        ),
        (
            ["issue", "--ca", "{root}", "--cn", "Alice Smith", "--client", "--out", "{tmp}"],
            "--no-cn-san",
        ),
        (
            ["issue", "--ca", "{tmp}/nope", "--cn", "x", "--server", "--out", "{tmp}"],
            "no such directory",
        ),
        (["issue", "--ca", "{tmp}", "--cn", "x", "--server", "--out", "{tmp}"], "holds no ca.pem"),
        (["init-ca", "--out", "{tmp}/i", "--intermediate"], "--intermediate and --ca"),
        (
            ["init-ca", "--out", "{tmp}/i2", "--intermediate", "--ca", "{inter}"],
            "signs leaves only",
        ),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_and_config_errors_are_one_line_with_exit_2(
    made: Made, tmp_path: Path, args: list[str], says: str
) -> None:
    dirs = {"root": str(made.root), "inter": str(made.inter), "tmp": str(tmp_path)}
    line = one_line_error(certs_cmd(*(arg.format(**dirs) for arg in args)))
    assert says in line
    assert not list(tmp_path.glob("*.pem"))


def test_cn_that_cannot_name_a_file_is_issued_under_name_override(
    made: Made, tmp_path: Path
) -> None:
    args = ["issue", "--ca", made.root, "--cn", "*.example.com", "--server", "--out", tmp_path]
    assert "--name" in one_line_error(certs_cmd(*args))
    ok(*args, "--name", "wildcard")
    assert "DNS:*.example.com" in openssl_text(tmp_path / "wildcard.pem")


def test_ca_key_that_does_not_match_the_ca_certificate_is_refused(
    made: Made, tmp_path: Path
) -> None:
    (tmp_path / "ca.pem").write_bytes((made.root / "ca.pem").read_bytes())
    (tmp_path / "ca.key").write_bytes((made.inter / "ca.key").read_bytes())
    line = one_line_error(
        certs_cmd("issue", "--ca", tmp_path, "--cn", "x", "--server", "--out", tmp_path / "o")
    )
    assert "does not match" in line and "ca.key" in line


def test_leaf_certificate_is_refused_as_a_ca(made: Made, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(made.cert("app").read_bytes())
    (tmp_path / "ca.key").write_bytes((made.out / "app.key").read_bytes())
    line = one_line_error(
        certs_cmd("issue", "--ca", tmp_path, "--cn", "x", "--server", "--out", tmp_path / "o")
    )
    assert "is not a CA certificate" in line


def test_inspect_prints_every_certificate_with_openssl_fingerprint_and_serial(made: Made) -> None:
    out = ok("inspect", made.out / "deep-chain.pem")
    leaf, inter = out.split("[2/2: certificate]")
    assert "subject:              CN=deep" in leaf
    assert "SANs:                 DNS:deep" in leaf
    assert "issuer:               CN=Example Issuing CA" in leaf
    serial = openssl("x509", "-in", made.cert("deep"), "-noout", "-serial").stdout.split("=")[1]
    shown = re.search(r"serial:\s+([0-9a-f:]+)\n", leaf)
    assert shown is not None and int(shown.group(1).replace(":", ""), 16) == int(serial, 16)
    assert re.search(r"not after:\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\n", leaf)
    assert "kind:                 leaf" in leaf and "key:                  EC P-256" in leaf
    assert "key usage:            digitalSignature (critical)" in leaf
    assert "extended key usage:   serverAuth" in leaf
    assert f"SHA-256 fingerprint:  {fingerprint(made.cert('deep'))}" in leaf
    assert "kind:                 intermediate CA (path length 0)" in inter
    assert f"SHA-256 fingerprint:  {fingerprint(made.inter / 'ca.pem')}" in inter


def test_inspect_marks_expired_and_not_yet_valid(made: Made, tmp_path: Path) -> None:
    ca = load_ca_dir(made.root).issued
    now = datetime.datetime.now(datetime.timezone.utc)
    certs.issue(ca, "old", days=1, not_before=now - datetime.timedelta(days=3)).write(
        tmp_path, "old"
    )
    certs.issue(ca, "new", not_before=now + datetime.timedelta(days=2)).write(tmp_path, "new")
    out = ok("inspect", tmp_path / "old.pem", tmp_path / "new.pem")
    assert re.search(r"not after:.* UTC \(expired\)", out)
    assert re.search(r"not before:.* UTC \(not yet valid\)", out)
    assert out.count("(expired)") == 1 and out.count("(not yet valid)") == 1


def test_inspect_describes_a_private_key_without_printing_it(made: Made, tmp_path: Path) -> None:
    key = (made.out / "app.key").read_text()
    combined = tmp_path / "combined.pem"
    combined.write_text(made.cert("app").read_text() + key)
    out = ok("inspect", made.out / "app.key", combined)
    assert "private key:          EC P-256 (secret part not shown)" in out
    public = re.findall(r"public key SHA-256:\s+(\S+)", out)
    assert len(public) == 3 and len(set(public)) == 1  # key alone, cert, key in the combined file
    body = [line for line in key.splitlines() if not line.startswith("-----")]
    assert not any(line in out for line in body)
    assert "PRIVATE KEY-----" not in out


def test_verify_says_ok_for_good_server_and_client_certificates(made: Made) -> None:
    ca = made.root / "ca.pem"
    out = ok("verify", "--ca", ca, made.out / "deep-chain.pem", "--server-name", "deep")
    assert out.startswith("OK: ") and "'CN=Example Issuing CA'" in out
    assert ok("verify", "--ca", ca, made.cert("app"), "--server-name", "127.0.0.1").startswith(
        "OK: "
    )
    assert ok("verify", "--ca", ca, made.cert("alice"), "--client").startswith("OK: ")
    assert ok("verify", "--ca", ca, made.cert("both"), "--client").startswith("OK: ")


def _expired(made: Made, tmp_path: Path) -> tuple[Path, str]:
    now = datetime.datetime.now(datetime.timezone.utc)
    old = certs.issue(
        load_ca_dir(made.root).issued,
        "app",
        usage="server",
        days=1,
        not_before=now - datetime.timedelta(days=3),
    )
    old.write(tmp_path, "old")
    return (
        tmp_path / "old.pem",
        f"expired on {old.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
    )


def test_verify_fails_with_exit_1_and_the_reason(made: Made, tmp_path: Path) -> None:
    ca, inter_ca = made.root / "ca.pem", made.inter / "ca.pem"
    expired, expired_reason = _expired(made, tmp_path)
    cases = [
        (["--ca", inter_ca, made.cert("app")], "unknown CA: issued by 'CN=Example Root CA'"),
        (["--ca", ca, made.cert("deep")], "unknown CA: issued by 'CN=Example Issuing CA'"),
        (["--ca", ca, expired, "--server-name", "app"], expired_reason),
        (
            ["--ca", ca, made.cert("app"), "--server-name", "db"],
            "name mismatch: wanted db, cert names are [DNS:app, DNS:app.internal, IP:127.0.0.1]",
        ),
        (
            ["--ca", ca, made.cert("alice")],
            "wrong EKU: a server needs serverAuth, cert has [clientAuth]",
        ),
        (["--ca", ca, made.cert("app"), "--client"], "wrong EKU: a client needs clientAuth"),
    ]
    for args, reason in cases:
        result = certs_cmd("verify", *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stdout.startswith("FAIL: ") and reason in result.stdout, (args, result.stdout)
        assert len(result.stdout.splitlines()) == 1


def test_verify_usage_errors_exit_2(made: Made, tmp_path: Path) -> None:
    ca = made.root / "ca.pem"
    assert "no such file" in one_line_error(certs_cmd("verify", "--ca", ca, tmp_path / "none.pem"))
    assert "holds no PEM certificate" in one_line_error(
        certs_cmd("verify", "--ca", made.out / "app.key", made.cert("app"))
    )
    line = one_line_error(
        certs_cmd("verify", "--ca", ca, made.cert("app"), "--client", "--server-name", "a")
    )
    assert "--client and --server-name" in line


def test_certificate_made_by_openssl_is_verified_and_inspected(tmp_path: Path) -> None:
    def run(command: str, *quoted: str) -> None:
        """openssl with command's words, then arguments that hold spaces."""
        result = subprocess.run(
            ["openssl", *command.split(), *quoted],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr

    ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    run(
        f"req -x509 {ec} -keyout ca.key -out ca.pem -days 2",
        *("-subj", "/CN=OpenSSL CA", "-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign"),
    )
    (tmp_path / "ext").write_text("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    run("req -new -newkey rsa:2048 -nodes -keyout s.key -out s.csr -subj /CN=osl")
    run(
        "x509 -req -in s.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext",
        "-out",
        "s.pem",
    )
    ca, leaf = tmp_path / "ca.pem", tmp_path / "s.pem"
    assert ok("verify", "--ca", ca, leaf, "--server-name", "localhost").startswith("OK: ")
    assert "wrong EKU" in certs_cmd("verify", "--ca", ca, leaf, "--client").stdout
    out = ok("inspect", leaf)
    assert f"SHA-256 fingerprint:  {fingerprint(leaf)}" in out
    assert "key:                  RSA 2048" in out and "issuer:               CN=OpenSSL CA" in out


_TRUTH_TABLE = [
    # auth, client_auth, role, signs
    ("true", "true", "server", True),
    ("true", "true", "client", True),
    ("true", "false", "server", True),
    ("true", "false", "client", False),
    ("false", "true", "server", False),
    ("false", "true", "client", False),
    ("false", "false", "server", False),
    ("false", "false", "client", False),
]


# The whole table by flags; by environment (as a Dockerfile sets it), one row for each
# way the rule can go: signed for a client, signed for a server, and both refusals.
_CASES = [("flags", *row) for row in _TRUTH_TABLE] + [
    ("env", *_TRUTH_TABLE[i]) for i in (1, 2, 3, 4)
]


@pytest.mark.parametrize(("via", "auth", "client_auth", "role", "signs"), _CASES)
def test_provision_signs_iff_auth_and_client_auth_or_server(
    made: Made, tmp_path: Path, via: str, auth: str, client_auth: str, role: str, signs: bool
) -> None:
    settings = {"AUTH": auth, "CLIENT_AUTH": client_auth, "ROLE": role, "COMMON_NAME": "node"}
    ca = ["--ca-cert", made.root / "ca.pem", "--ca-key", made.root / "ca.key"]
    if via == "flags":
        flags = ["--auth", auth, "--client-auth", client_auth, "--role", role, "--cn", "node"]
        out = ok("provision", *flags, *ca, "--out", tmp_path)
    else:
        out = ok("provision", *ca, "--out", tmp_path, env=settings)
    assert len(out.splitlines()) == 1
    cert = tmp_path / "node.pem"
    if not signs:
        assert out.startswith("not signing: ")
        assert not list(tmp_path.iterdir())
        return
    assert out.startswith(f"signed {role} certificate 'CN=node'")
    purpose, other = ("sslserver", "sslclient") if role == "server" else ("sslclient", "sslserver")
    assert openssl_verifies(made.root / "ca.pem", cert, purpose=purpose)
    assert not openssl_verifies(made.root / "ca.pem", cert, purpose=other)
    assert "DNS:node" in openssl_text(cert)
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600


def test_provision_without_auth_runs_with_no_ca_material_at_all(tmp_path: Path) -> None:
    out = ok("provision", env={"AUTH": "false", "CLIENT_AUTH": "false", "ROLE": "client"})
    assert out == "not signing: AUTH=false (no TLS, so no certificate)\n"


@pytest.mark.parametrize("bad", ["True", "yes", ""])
def test_provision_accepts_only_true_or_false(bad: str) -> None:
    line = one_line_error(
        certs_cmd("provision", "--auth", bad, "--client-auth", "false", "--role", "server")
    )
    assert line.endswith(f"--auth must be true or false, not {bad!r}")
    env = {"AUTH": "true", "CLIENT_AUTH": bad, "ROLE": "client"}
    line = one_line_error(certs_cmd("provision", env=env))
    assert f"CLIENT_AUTH (environment) must be true or false, not {bad!r}" in line


def test_provision_flags_win_over_environment(made: Made, tmp_path: Path) -> None:
    env = {"AUTH": "false", "CLIENT_AUTH": "false", "ROLE": "client", "COMMON_NAME": "envname"}
    out = ok(
        "provision",
        "--auth",
        "true",
        "--role",
        "server",
        "--cn",
        "flagname",
        "--ca-cert",
        made.root / "ca.pem",
        "--out",
        tmp_path,
        env=env,
    )
    assert out.startswith("signed server certificate 'CN=flagname'")
    assert (tmp_path / "flagname.pem").exists()


def test_provision_ca_name_names_the_ca_certificate_with_its_key_beside_it(
    made: Made, tmp_path: Path
) -> None:
    env = {"AUTH": "true", "CLIENT_AUTH": "true", "ROLE": "client", "COMMON_NAME": "worker"}
    ok("provision", "--out", tmp_path, env={**env, "CA_NAME": str(made.inter / "ca")})
    assert openssl_verifies(
        made.root / "ca.pem",
        tmp_path / "worker.pem",
        chain=tmp_path / "worker-chain.pem",
        purpose="sslclient",
    )
    line = one_line_error(
        certs_cmd("provision", "--out", tmp_path / "x", env={**env, "CA_NAME": "missing"})
    )
    assert line.endswith("CA_NAME=missing: no such file: missing.pem")


def test_provisioned_keys_complete_a_mutual_tls_handshake(made: Made, tmp_path: Path) -> None:
    ca = ["--ca-cert", made.root / "ca.pem", "--out", tmp_path]
    ok(
        "provision",
        "--auth",
        "true",
        "--client-auth",
        "true",
        "--role",
        "server",
        "--cn",
        "api",
        *ca,
    )
    ok(
        "provision",
        "--auth",
        "true",
        "--client-auth",
        "true",
        "--role",
        "client",
        "--cn",
        "caller",
        *ca,
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "api.pem", tmp_path / "api.key")
    server_ctx.load_verify_locations(made.root / "ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=made.root / "ca.pem")
    client_ctx.load_cert_chain(tmp_path / "caller.pem", tmp_path / "caller.key")
    # In-memory TLS: both ends driven by hand, so no socket or thread is needed.
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="api")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            try:
                end.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    peer = server.getpeercert()
    assert peer is not None and peer["subject"] == ((("commonName", "caller"),),)


def test_crl_revokes_certificates_as_openssl_checks_them_and_adds_at_each_run(
    made: Made, tmp_path: Path
) -> None:
    crl = tmp_path / "root.crl"
    first = ok("crl", "--ca", made.root, "--revoke", made.cert("alice"), "--out", crl)
    assert "CRL 1 of 'CN=Example Root CA', 1 revoked" in first, first

    def verify_with_crl(name: str) -> subprocess.CompletedProcess[str]:
        return openssl("verify", "-crl_check", "-CAfile", made.root / "ca.pem",
                       "-CRLfile", crl, made.cert(name))  # fmt: skip

    revoked = verify_with_crl("alice")
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr
    assert verify_with_crl("both").returncode == 0
    # A second run adds to the list and numbers the CRL one up; alice stays revoked.
    second = ok("crl", "--ca", made.root, "--serial", "0A:FF", "--out", crl)
    assert "CRL 2 of 'CN=Example Root CA', 2 revoked (added: aff)" in second, second
    text = openssl("crl", "-in", crl, "-noout", "-text").stdout
    assert "Serial Number: 0AFF" in text and verify_with_crl("alice").returncode != 0


def test_crl_refuses_a_certificate_of_another_ca_and_a_file_that_is_no_crl(
    made: Made, tmp_path: Path
) -> None:
    line = one_line_error(
        certs_cmd("crl", "--ca", made.root, "--revoke", made.cert("deep"), "--out", tmp_path / "x")
    )
    assert "was issued by 'CN=Example Issuing CA', not by 'CN=Example Root CA'" in line, line
    other = tmp_path / "notes.txt"
    other.write_text("not a CRL")
    line = one_line_error(certs_cmd("crl", "--ca", made.root, "--out", other))
    assert "exists and is not a CRL of 'CN=Example Root CA'; give --force" in line, line
    ok("crl", "--ca", made.root, "--out", other, "--force")
    assert "BEGIN X509 CRL" in other.read_text()
