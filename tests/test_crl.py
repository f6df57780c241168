"""Certificate revocation lists (crl, crl_stale): a caller its CA's CRL lists is refused on both
data planes with a reason naming the CRL, and never reaches the app; CRLs made by `openssl ca
-gencrl` and by cryptography, PEM and DER; a caller whose issuer has no CRL is refused; a stale
CRL warns or denies, at start-up and when it goes stale while serving; a reload takes new CRLs
(and keeps the last good ones when the new are bad); bad CRLs exit 2 with one line."""

from __future__ import annotations

import datetime
import shutil
import signal
import ssl
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar import certs
from sidecar.config.pem import PemSource
from sidecar.pki.revocation import load_revocations
from tests.conftest import Pki, SidecarFactory, SidecarProcess, assert_config_error, make_crl
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _serial(pki: Pki, name: str) -> int:
    return x509.load_pem_x509_certificate(pki.cert(name).read_bytes()).serial_number


def _write(crl: x509.CertificateRevocationList, path: Path, *, der: bool = False) -> Path:
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    path.write_bytes(crl.public_bytes(encoding))
    return path


def _openssl_crl(pki: Pki, directory: Path, revoke: str) -> Path:
    """The test CA's CRL as `openssl ca` makes it: `-revoke` then `-gencrl` (PEM)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (the Debian package openssl provides it)")
    directory.mkdir(exist_ok=True)
    (directory / "index.txt").write_text("")
    (directory / "crlnumber").write_text("1000\n")
    (directory / "ca.key").write_bytes(pki.ca.key_pem)
    config = directory / "ca.cnf"
    config.write_text(
        "[ca]\ndefault_ca = test\n[test]\n"
        f"database = {directory}/index.txt\ncrlnumber = {directory}/crlnumber\n"
        f"certificate = {pki.dir}/ca.pem\nprivate_key = {directory}/ca.key\n"
        "default_md = sha256\ndefault_crl_days = 7\n"
    )

    def openssl(*args: str) -> None:
        result = subprocess.run(
            ["openssl", "ca", "-config", str(config), "-batch", *args],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    openssl("-revoke", str(pki.cert(revoke)), "-crl_reason", "keyCompromise")
    crl = directory / "crl.pem"
    openssl("-gencrl", "-out", str(crl))
    return crl


def _call(sidecar: SidecarProcess, pki: Pki, name: str) -> tuple[grpc.StatusCode, str]:
    with sidecar.channel(pki, name) as channel:
        return _code(channel)


def _code(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    try:
        channel.unary_unary(UNARY)(b"x", timeout=10)
    except grpc.RpcError as error:
        return error.code(), str(error.details())
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_caller_revoked_by_openssl_ca_is_refused_and_the_others_pass(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    crl = _openssl_crl(pki, tmp_path / "openssl-ca", revoke="alice")
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--allow-cn", "mallory", "--crl", str(crl),
        "--data-plane", data_plane,
    )  # fmt: skip
    sidecar.wait_for("CRL loaded: crl.pem: issuer CN=Test Root CA, 1 revoked certificate")
    code, details = _call(sidecar, pki, "alice")
    serial = f"{_serial(pki, 'alice'):x}"
    assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
    assert f"peer CN=alice: certificate serial {serial} is revoked (crl crl.pem)" in details
    assert _call(sidecar, pki, "mallory")[0] == grpc.StatusCode.OK
    assert len(probe.calls) == 1  # alice's call never reached the app


def test_a_der_crl_made_with_cryptography_and_a_caller_whose_issuer_has_none(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """The bundle trusts two CAs and a CRL is given for one: the other's callers are refused
    (they cannot be checked), as OpenSSL's CRL check refuses them."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((pki.dir / "ca.pem").read_bytes() + (pki.dir / "other-ca.pem").read_bytes())
    crl = _write(make_crl(pki.ca, [_serial(pki, "mallory")]), tmp_path / "root.crl", der=True)
    sidecar = sidecars.serving(
        probe.port, "--cert", str(pki.cert("server")), "--key", str(pki.key("server")),
        "--ca", str(bundle), "--allow-cn", "alice", "--allow-cn", "mallory",
        "--crl", str(crl), default_tls=False,
    )  # fmt: skip
    assert _call(sidecar, pki, "alice")[0] == grpc.StatusCode.OK
    code, details = _call(sidecar, pki, "mallory")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "is revoked (crl root.crl)" in details
    code, details = _call(sidecar, pki, "stranger")  # CN=alice, from Some Other CA
    assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
    assert "no CRL of its issuer CN=Some Other CA is loaded (crl)" in details, details
    assert len(probe.calls) == 1


@pytest.mark.parametrize(
    ("stale", "expected_code", "log"),
    [
        ("warn", grpc.StatusCode.OK, "WARNING"),
        ("deny", grpc.StatusCode.PERMISSION_DENIED, "ERROR"),
    ],
)
@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_stale_crl_warns_or_denies_as_crl_stale_says(
    sidecars: SidecarFactory,
    pki: Pki,
    probe: Probe,
    tmp_path: Path,
    stale: str,
    expected_code: grpc.StatusCode,
    log: str,
    data_plane: str,
) -> None:
    old = make_crl(
        pki.ca, [_serial(pki, "mallory")], last_update=NOW - 9 * DAY, next_update=NOW - DAY
    )
    crl = _write(old, tmp_path / "old.crl")
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--allow-cn", "mallory", "--crl", str(crl),
        "--crl-stale", stale, "--data-plane", data_plane,
    )  # fmt: skip
    sidecar.wait_for(f"{log} .*CRL old.crl is stale \\(past its nextUpdate\\)")
    code, details = _call(sidecar, pki, "alice")
    assert code == expected_code, (code, details)
    if stale == "deny":
        assert "the CRL of its issuer (old.crl) is stale since" in details, details
    # Its revocations apply either way.
    assert _call(sidecar, pki, "mallory")[0] == grpc.StatusCode.PERMISSION_DENIED


def test_a_crl_going_stale_while_serving_denies_on_open_connections(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3)
    crl = _write(make_crl(pki.ca, next_update=soon), tmp_path / "short.crl")
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--crl", str(crl), "--crl-stale", "deny"
    )
    with sidecar.channel(pki, "alice") as alice:
        assert _code(alice)[0] == grpc.StatusCode.OK
        sidecar.wait_for("CRL short.crl is stale")
        code, details = _code(alice)  # the same connection: its decisions are made anew
    assert code == grpc.StatusCode.PERMISSION_DENIED and "is stale since" in details, details


def test_a_reload_takes_a_new_crl_and_keeps_the_last_good_one(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    crl = _write(make_crl(pki.ca), tmp_path / "ca.crl")
    config = tmp_path / "sidecar.yaml"
    route = {
        "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{probe.port}",
        "cert": str(pki.cert("server")), "key": str(pki.key("server")),
        "ca": str(pki.dir / "ca.pem"), "allow_cn": ["alice", "mallory"],
        "crl": "ca.crl",  # relative to the config file
    }  # fmt: skip
    config.write_text(yaml.safe_dump(route))
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    with sidecar.channel(pki, "alice") as alice:
        assert _code(alice)[0] == grpc.StatusCode.OK
        _write(make_crl(pki.ca, [_serial(pki, "alice")]), crl)
        sidecar.signal(signal.SIGHUP)
        sidecar.wait_for("CN=alice is no longer allowed")
        code, details = _code(alice)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "(crl ca.crl)" in details, details
    # A CRL signed by a CA the route does not trust: refused, the last good one stays.
    _write(make_crl(pki.ca, [], signer=pki.other_ca), crl)
    sidecar.signal(signal.SIGHUP)
    sidecar.wait_for("CRLs not reloaded, the current ones stay: .*signature does not verify")
    assert _call(sidecar, pki, "alice")[0] == grpc.StatusCode.PERMISSION_DENIED
    assert _call(sidecar, pki, "mallory")[0] == grpc.StatusCode.OK
    # The crl setting removed from the file: no caller is checked against a CRL any more.
    config.write_text(yaml.safe_dump({key: v for key, v in route.items() if key != "crl"}))
    sidecar.signal(signal.SIGHUP)
    sidecar.wait_for("crl removed: callers are no longer checked against CRLs")
    assert _call(sidecar, pki, "alice")[0] == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda pki, path: path.write_bytes(b"garbage"), "not a CRL (PEM or DER)"),
        (
            lambda pki, path: path.write_bytes((pki.dir / "ca.pem").read_bytes()),
            "no CRL in it (PEM blocks of type X509 CRL)",
        ),
        (
            lambda pki, path: _write(make_crl(pki.other_ca), path),
            "its issuer CN=Some Other CA is not a certificate of --ca",
        ),
        (
            lambda pki, path: _write(make_crl(pki.ca, signer=pki.other_ca), path),
            "its signature does not verify with the key of CN=Test Root CA in --ca",
        ),
        (
            lambda pki, path: _write(
                make_crl(pki.ca, extensions=[(x509.DeltaCRLIndicator(5), True)]), path
            ),
            "a delta CRL; give the complete (base) CRL",
        ),
        (
            lambda pki, path: path.write_bytes(
                make_crl(pki.ca).public_bytes(serialization.Encoding.PEM) * 2
            ),
            "a second CRL of CN=Test Root CA",
        ),
    ],
    ids=["garbage", "a-certificate", "issuer-not-trusted", "bad-signature", "delta", "twice"],
)
def test_a_crl_that_cannot_be_used_exits_2_naming_the_file(
    sidecars: SidecarFactory, pki: Pki, tmp_path: Path, make: object, expected: str
) -> None:
    path = tmp_path / "bad.crl"
    make(pki, path)  # type: ignore[operator]
    args = ["--upstream", "127.0.0.1:1", "--allow-cn", "alice", "--crl", str(path),
            *sidecars.tls_args()]  # fmt: skip
    line = assert_config_error(sidecars, args, expected)
    assert f"--crl: {path}" in line, line


def test_crl_is_for_ingress_routes_with_a_ca_file(sidecars: SidecarFactory, pki: Pki) -> None:
    crl = str(pki.dir / "ca.pem")
    args = ["--mode", "egress", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
            "--crl", crl, *sidecars.tls_args()]  # fmt: skip
    assert_config_error(sidecars, args, "--crl applies to ingress routes only")
    args = ["--upstream", "127.0.0.1:1", "--allow-cn", "a", "--crl-stale", "deny",
            *sidecars.tls_args()]  # fmt: skip
    assert_config_error(sidecars, args, "--crl-stale is given, but no crl")


def test_explain_checks_the_callers_certificate_against_the_crl(
    sidecars: SidecarFactory, pki: Pki, tmp_path: Path
) -> None:
    crl = _write(make_crl(pki.ca, [_serial(pki, "alice")]), tmp_path / "ca.crl")
    config = tmp_path / "sidecar.yaml"
    route = {
        "upstream": "127.0.0.1:1", "cert": str(pki.cert("server")),
        "key": str(pki.key("server")), "ca": str(pki.dir / "ca.pem"),
        "allow_cn": ["alice", "mallory"], "crl": [str(crl)],
    }  # fmt: skip
    config.write_text(yaml.safe_dump(route))
    explain = ["explain", "--config", str(config), "--method", UNARY]
    revoked = sidecars.run(*explain, "--cert", str(pki.cert("alice")))
    assert revoked.returncode == 1, revoked.stdout + revoked.stderr
    assert "is revoked (crl ca.crl)" in revoked.stdout, revoked.stdout
    allowed = sidecars.run(*explain, "--cert", str(pki.cert("mallory")))
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "crl ca.crl: the certificate is not revoked" in allowed.stdout, allowed.stdout
    by_name = sidecars.run(*explain, "--cn", "alice")
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    assert "crl: not checked (give the caller's certificate with --cert)" in by_name.stdout


def test_a_ca_whose_extensions_cannot_be_read_is_one_line_when_its_crl_is_checked(
    sidecars: SidecarFactory, pki: Pki, tmp_path: Path
) -> None:
    """A CA of the bundle with its KeyUsage twice serves (OpenSSL takes it as a trust
    anchor), but its CRL cannot be checked against it: exit 2 with one line, not a
    traceback."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Twice CA")])
    stand_in = x509.ObjectIdentifier("1.2.3.4")
    drafted = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(5)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(*[False] * 5, True, True, False, False), critical=True)
        # A second KeyUsage, under a stand-in OID the builder lets through, renamed below.
        .add_extension(x509.UnrecognizedExtension(stand_in, b"\x03\x02\x01\x06"), critical=True)
        .sign(key, hashes.SHA256())
    )
    der = drafted.public_bytes(serialization.Encoding.DER)
    twice = der.replace(bytes.fromhex("06032a0304"), bytes.fromhex("0603551d0f"))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.cert_pem + ssl.DER_cert_to_PEM_cert(twice).encode())
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(NOW - DAY)
        .next_update(NOW + DAY)
        .sign(key, hashes.SHA256())
    )
    path = _write(crl, tmp_path / "twice.crl")
    args = ["--upstream", "127.0.0.1:1", "--allow-cn", "alice", "--cert", str(pki.cert("server")),
            "--key", str(pki.key("server")), "--ca", str(bundle), "--crl", str(path)]  # fmt: skip
    assert_config_error(sidecars, args, "--ca: a CA certificate (serial 5) cannot be read")


@pytest.mark.parametrize(
    "begins",
    [
        pytest.param(b"-----BEGIN X509 CRL-----\n" * 170_000, id="one-label"),
        pytest.param(
            b"".join(b"-----BEGIN L%d-----\n" % i for i in range(200_000)) + b"-----END X-----",
            id="distinct-labels",
        ),
    ],
)
def test_a_crl_file_of_begin_lines_is_refused_as_soon_as_read(
    sidecars: SidecarFactory, pki: Pki, tmp_path: Path, begins: bytes
) -> None:
    """Megabytes of BEGIN lines and no END of theirs: one pass over the file (backtracking
    regular expressions, then a search per label, took minutes over 0.5 MiB, with the
    event loop stopped)."""
    path = tmp_path / "begins.crl"
    path.write_bytes(begins)
    args = ["--upstream", "127.0.0.1:1", "--allow-cn", "alice", "--crl", str(path),
            *sidecars.tls_args()]  # fmt: skip
    assert_config_error(sidecars, args, "no CRL in it")


def test_two_cas_of_one_name_each_have_their_own_crl(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """A CA whose key was replaced keeps its name: the bundle trusts both keys, and a
    caller is checked against the CRL signed by its issuer's key (its AuthorityKeyIdentifier
    says which), never against the other one's."""
    renewed = certs.init_ca("Test Root CA")  # same name, another key
    bob = certs.issue(renewed, "bob", usage="client")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.cert_pem + renewed.cert_pem)
    old_crl = _write(make_crl(pki.ca), tmp_path / "old-key.crl")
    new_crl = _write(make_crl(renewed, [bob.certificate.serial_number]), tmp_path / "new-key.crl")
    bob_credentials = grpc.ssl_channel_credentials(bundle.read_bytes(), bob.key_pem, bob.cert_pem)

    def bob_calls(sidecar: SidecarProcess) -> tuple[grpc.StatusCode, str]:
        with grpc.secure_channel(f"127.0.0.1:{sidecar.port}", bob_credentials) as channel:
            return _code(channel)

    tls = ["--cert", str(pki.cert("server")), "--key", str(pki.key("server")), "--ca", str(bundle)]
    allow = ["--allow-cn", "alice", "--allow-cn", "bob"]
    only_old = sidecars.serving(probe.port, *tls, *allow, "--crl", str(old_crl), default_tls=False)
    code, details = bob_calls(only_old)
    assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
    assert "no CRL of its issuer CN=Test Root CA (with its key) is loaded" in details, details
    both = sidecars.serving(
        probe.port, *tls, *allow, "--crl", str(old_crl), "--crl", str(new_crl), default_tls=False
    )
    code, details = bob_calls(both)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "is revoked (crl new-key.crl)" in details
    assert _call(both, pki, "alice")[0] == grpc.StatusCode.OK
    assert len(probe.calls) == 1


def _bare_ca(name: str) -> certs.Issued:
    """A CA certificate without SubjectKeyIdentifier (its leaves' AKI may be made any way)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certs.Issued(certificate, key)


def test_which_crl_covers_a_certificate_when_cas_share_a_name() -> None:
    """One CA of the name: its CRL, whatever key id the certificate's AKI gives (a CA without
    SubjectKeyIdentifier may have derived it otherwise). Several: the AKI decides, and a
    certificate naming no key is covered only if every CA of the name has its CRL here."""
    lone = _bare_ca("Lone CA")
    crl = make_crl(lone, [5]).public_bytes(serialization.Encoding.PEM)
    source = (PemSource("crl", inline=crl),)
    loaded = load_revocations(source, (crl,), lone.cert_pem, "ca", "warn")
    assert loaded.refusal("CN=Lone CA", "ab" * 20, "6") is None
    assert (
        loaded.refusal("CN=Lone CA", "ab" * 20, "5")
        == "certificate serial 5 is revoked (crl inline PEM)"
    )

    first, second = _bare_ca("Twin CA"), _bare_ca("Twin CA")
    bundle = first.cert_pem + second.cert_pem
    first_crl = make_crl(first).public_bytes(serialization.Encoding.PEM)
    one = load_revocations(
        (PemSource("crl", inline=first_crl),), (first_crl,), bundle, "ca", "warn"
    )
    (first_list,) = one.lists
    assert one.refusal("CN=Twin CA", first_list.signer_key_id, "6") is None
    for unknown_key in ("", "ab" * 20):  # no AKI, or another key's: not checked, refused
        refusal = one.refusal("CN=Twin CA", unknown_key, "6")
        assert refusal is not None and refusal.startswith("no CRL of its issuer CN=Twin CA")
    second_crl = make_crl(second).public_bytes(serialization.Encoding.PEM)
    both = load_revocations(
        (PemSource("crl", inline=first_crl), PemSource("crl", inline=second_crl)),
        (first_crl, second_crl), bundle, "ca", "warn",
    )  # fmt: skip
    assert both.refusal("CN=Twin CA", "", "6") is None  # every CA of the name has its CRL
