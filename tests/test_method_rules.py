"""Per-method rules through the real process, on both data planes: each call is decided on
its method, denied calls are answered by the sidecar and never reach the app, and allowed
and denied calls interleave on one connection, a denied 10 MiB upload included."""

from __future__ import annotations

import datetime
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import UNLIMITED, Pki, SidecarFactory, SidecarProcess
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"
SERVER_STREAM = "/probe.Probe/ServerStream"
CLIENT_STREAM = "/probe.Probe/ClientStream"

RULES = [
    {"name": "alice-unary", "action": "allow", "cn": ["alice"], "methods": [UNARY]},
    {"name": "platform-uploads", "action": "allow", "ou": ["platform"],
     "methods": [CLIENT_STREAM]},
    {"name": "no-probe", "action": "deny", "any": True, "methods": ["/probe.Probe/*"]},
    {"name": "alice-rest", "action": "allow", "cn": ["alice"], "methods": ["*"]},
]  # fmt: skip


def _ops_credentials(pki: Pki) -> grpc.ChannelCredentials:
    """A client certificate with OU=platform (and CN=ops, named by no rule)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "platform"),
        x509.NameAttribute(NameOID.COMMON_NAME, "ops"),
    ])  # fmt: skip
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(pki.ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return grpc.ssl_channel_credentials(
        (pki.dir / "ca.pem").read_bytes(),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate.public_bytes(serialization.Encoding.PEM),
    )


def _start(
    sidecars: SidecarFactory,
    pki: Pki,
    probe: Probe,
    tmp_path: Path,
    data_plane: str,
    rules: list[dict[str, object]] = RULES,
) -> SidecarProcess:
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{probe.port}",
        "cert": str(pki.cert("server")), "key": str(pki.key("server")),
        "ca": str(pki.dir / "ca.pem"), "data_plane": data_plane, "rules": rules,
    }))  # fmt: skip
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    return sidecar


def _code(call: grpc.UnaryUnaryMultiCallable) -> tuple[grpc.StatusCode, str]:
    try:
        call(b"x", timeout=10)
    except grpc.RpcError as error:
        return error.code(), str(error.details())
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_each_call_is_decided_on_its_method_first_match_wins(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    sidecar = _start(sidecars, pki, probe, tmp_path, data_plane)
    target = f"127.0.0.1:{sidecar.port}"
    with sidecar.channel(pki, "alice") as alice:
        assert alice.unary_unary(UNARY)(b"ok", timeout=10) == b"ok"
        # alice-rest would allow it, but no-probe comes first.
        with pytest.raises(grpc.RpcError) as denied:
            list(alice.unary_stream(SERVER_STREAM)(b"x", timeout=10))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        details = str(denied.value.details())
        assert f"peer CN=alice is not allowed to call {SERVER_STREAM} (rule 'no-probe')" in details
        assert (
            _code(alice.unary_unary("/other.Service/Call"))[0] != grpc.StatusCode.PERMISSION_DENIED
        )
    with grpc.secure_channel(target, _ops_credentials(pki), options=UNLIMITED) as ops:
        assert ops.stream_unary(CLIENT_STREAM)(iter([b"a", b"b"]), timeout=10) == b"ab"
        code, details = _code(ops.unary_unary(UNARY))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "(rule 'no-probe')" in details
        code, details = _code(ops.unary_unary("/other.Service/Call"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "(no rule matched)" in details
    seen = [call.method for call in probe.calls]
    assert seen.count("ServerStream") == 0, "a denied call reached the app"
    assert seen.count("Unary") == 1 and seen.count("ClientStream") == 1, seen


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_path_that_is_not_service_slash_method_is_refused_not_matched_around(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    """`probe.Probe/ServerStream` (no leading slash) would match no rule as written, and an
    app may route it as `/probe.Probe/ServerStream` (grpc-go does): a deny rule written
    around. Every :path other than /service/method is a malformed request."""
    sidecar = _start(sidecars, pki, probe, tmp_path, data_plane)
    with sidecar.channel(pki, "alice") as alice:
        for path in ("probe.Probe/ServerStream", "/probe.Probe/Unary?x=1", "//probe.Probe/Unary",
                     "/probe.Probe/Server%53tream"):  # fmt: skip
            code, details = _code(alice.unary_unary(path))
            assert code == grpc.StatusCode.INTERNAL, (path, code, details)
            assert "malformed request: :path" in details and "is not /service/method" in details
    assert probe.calls == []


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_caller_the_rules_allow_nothing_is_refused_without_an_app_connection(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    """carol matches only the deny rule: every call is denied, none reaches the app."""
    sidecar = _start(sidecars, pki, probe, tmp_path, data_plane)
    with sidecar.channel(pki, "carol") as carol:
        for method in (UNARY, "/other.Service/Call"):
            code, details = _code(carol.unary_unary(method))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
    assert probe.calls == []
    sidecar.wait_for("denied: peer CN=carol")


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_denied_upload_of_10_mib_does_not_stall_allowed_calls_on_its_connection(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    """alice may not call ClientStream (no-probe); she sends 10 MiB on one while her unary
    calls go on over the same connection. The sidecar answers the upload PERMISSION_DENIED
    and drops its DATA, returning the flow-control credit, so nothing waits on it."""
    sidecar = _start(sidecars, pki, probe, tmp_path, data_plane)
    unary_done = threading.Event()

    def upload() -> Iterator[bytes]:
        for _ in range(10):
            yield b"u" * (1024 * 1024)
        unary_done.wait(30)  # hold the stream open until the unary calls are through

    with sidecar.channel(pki, "alice") as alice:
        denied = alice.stream_unary(CLIENT_STREAM).future(upload(), timeout=60)
        unary = alice.unary_unary(UNARY)
        for index in range(20):
            payload = b"call %d" % index
            assert unary(payload, timeout=10) == payload
        unary_done.set()
        with pytest.raises(grpc.RpcError) as raised:
            denied.result(timeout=30)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [call.method for call in probe.calls].count("ClientStream") == 0


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_reload_of_the_rules_applies_to_calls_on_open_connections(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    """alice stays admitted (she may still call something), but Unary, allowed and
    remembered on her connection, is denied from the reload on."""
    sidecar = _start(sidecars, pki, probe, tmp_path, data_plane)
    with sidecar.channel(pki, "alice") as alice:
        unary = alice.unary_unary(UNARY)
        assert unary(b"before", timeout=10) == b"before"
        config = tmp_path / "sidecar.yaml"
        changed = yaml.safe_load(config.read_text())
        changed["rules"] = [{"action": "allow", "cn": ["alice"], "methods": [SERVER_STREAM]}]
        config.write_text(yaml.safe_dump(changed))
        before = sum("allowlist reloaded" in line for line in sidecar.lines)
        sidecar.signal(signal.SIGHUP)
        sidecar.wait_for_count("allowlist reloaded", before + 1)
        code, details = _code(unary)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "(no rule matched)" in details
        responses = list(alice.unary_stream(SERVER_STREAM)(b"x", timeout=10))
        assert responses[:1] == [b"x0"]


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_deny_rule_in_audit_mode_lets_calls_through_and_says_so(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    """The rule being tried out (mode: audit) would deny carol's Unary: the call reaches the
    app, and a WARNING names the rule that would have denied it."""
    rules = [
        {"name": "trial", "action": "deny", "cn": ["carol"], "methods": [UNARY], "mode": "audit"},
        {"action": "allow", "cn": ["alice"], "methods": ["*"]},
    ]
    sidecar = _start(sidecars, pki, probe, tmp_path, data_plane, rules)
    with sidecar.channel(pki, "carol") as carol:
        assert carol.unary_unary(UNARY)(b"let through", timeout=10) == b"let through"
        code, details = _code(carol.unary_unary("/other.Service/Call"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "(no rule matched)" in details
    line = sidecar.wait_for("WARNING .*audit: would deny: .*")
    assert "peer CN=carol" in line.group(0) and f"{UNARY} (rule 'trial')" in line.group(0)


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_rules_mode_audit_lets_every_denial_through_but_revocations(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, data_plane: str
) -> None:
    """A whole route in audit mode: carol, allowed by nothing, reaches the app and the log says
    what would have denied her; a revoked certificate is refused all the same."""
    mallory_serial = x509.load_pem_x509_certificate(pki.cert("mallory").read_bytes()).serial_number
    sidecar = sidecars.serving(
        probe.port, "--allow-cn", "alice", "--rules-mode", "audit",
        "--deny-serials", f"{mallory_serial:x}", "--data-plane", data_plane,
    )  # fmt: skip
    with sidecar.channel(pki, "carol") as carol:
        assert carol.unary_unary(UNARY)(b"audited", timeout=10) == b"audited"
    with sidecar.channel(pki, "mallory") as mallory:
        code, details = _code(mallory.unary_unary(UNARY))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "is revoked" in details, details
    line = sidecar.wait_for("WARNING .*audit: would deny: .*")
    assert "peer CN=carol, DNS=carol.svc.example.org" in line.group(0)
    assert f"is not allowed to call {UNARY}" in line.group(0)
    assert len(probe.calls) == 1
