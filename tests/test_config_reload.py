"""A reload of the config file (SIGHUP, or a reload_interval check): allow rules and credential
files change in place, established connections are judged again by the new rules, and a
change that takes a restart is refused whole, with one ERROR, while the running
configuration serves on.

The sidecar runs as a process started with --config; the file is rewritten between
reloads, and every outcome is observed through real calls (and, for who is served which
certificate, a real TLS handshake).
"""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
import yaml

from sidecar.h2.frames import DATA, END_HEADERS, END_STREAM, HEADERS
from tests.conftest import Pki, SidecarFactory, SidecarProcess
from tests.hostile.peers import RawPeer, client_context, message, request_block
from tests.probe import Probe
from tests.test_reload import UNARY, _served_serial


def _write_config(path: Path, pki: Pki, upstream: int, **settings: object) -> None:
    """One ingress route on a free port, with the test PKI; settings override or add keys."""
    config: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "upstream": f"127.0.0.1:{upstream}",
        "cert": str(pki.cert("server")),
        "key": str(pki.key("server")),
        "ca": str(pki.dir / "ca.pem"),
        "allow_cn": ["alice", "carol"],
    }
    config.update(settings)
    path.write_text(yaml.safe_dump(config))


def _sighup(sidecar: SidecarProcess, outcome: str) -> str:
    """SIGHUP, then the reload's outcome line (one per SIGHUP: counted)."""
    before = sum(outcome in line for line in sidecar.lines)
    sidecar.signal(signal.SIGHUP)
    sidecar.wait_for_count(outcome, before + 1)
    return [line for line in sidecar.lines if outcome in line][-1]


def _code(call: grpc.UnaryUnaryMultiCallable, payload: bytes) -> grpc.StatusCode:
    try:
        call(payload, timeout=10)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_caller_removed_from_the_rules_is_denied_on_its_open_connection(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    """alice's next call after the reload is denied, on the connection it already has; the
    call it had in flight finishes; carol, still allowed, is untouched; and once alice is
    allowed again, a new connection of hers gets through."""
    config = tmp_path / "sidecar.yaml"
    _write_config(config, pki, probe.port, data_plane=data_plane)
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    gate = probe.gate("removed")
    with sidecar.channel(pki, "alice") as alice, sidecar.channel(pki, "carol") as carol:
        as_alice, as_carol = alice.unary_unary(UNARY), carol.unary_unary(UNARY)
        assert as_alice(b"before", timeout=10) == b"before"
        assert as_carol(b"before", timeout=10) == b"before"
        in_flight = as_alice.future(
            b"in flight", timeout=60, metadata=[("x-probe-gate", "removed")]
        )
        probe.wait_for_calls(3)

        _write_config(config, pki, probe.port, data_plane=data_plane, allow_cn=["carol"])
        _sighup(sidecar, "allowlist reloaded: allow allow-cn=carol")
        with pytest.raises(grpc.RpcError) as denied:
            as_alice(b"after", timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "peer CN=alice is not allowed to call /probe.Probe/Unary" in str(
            denied.value.details()
        )
        assert as_carol(b"after", timeout=10) == b"after"
        gate.set()
        assert in_flight.result() == b"in flight"  # admitted before the reload: it finishes
        if data_plane == "splice":
            sidecar.wait_for("CN=alice is no longer allowed: new calls on its 1 open connection")

        _write_config(config, pki, probe.port, data_plane=data_plane)
        _sighup(sidecar, "allowlist reloaded: allow allow-cn=alice,carol")
    with sidecar.channel(pki, "alice") as again:
        assert again.unary_unary(UNARY)(b"again", timeout=10) == b"again"
    seen = [request for call in probe.calls for request in call.requests]
    assert seen.count(b"after") == 1, "alice's denied call reached the app"  # carol's did
    assert sidecar.proc.poll() is None


def test_on_the_splice_a_revoked_connection_answers_new_calls_itself_then_closes(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """A client that ignores the drain's GOAWAY (a raw HTTP/2 peer) and starts another call
    on its connection gets PERMISSION_DENIED for it, from the sidecar, on that same
    connection; the app never sees it; the call in flight finishes; then the close."""
    config = tmp_path / "sidecar.yaml"
    _write_config(config, pki, probe.port)
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    gate = probe.gate("revoked")
    with RawPeer(sidecar.port, pki, "alice") as alice:
        alice.settle()
        block = request_block(UNARY, (("x-probe-gate", "revoked"),))
        alice.send_frame(HEADERS, END_HEADERS, 1, block)
        alice.send_frame(DATA, END_STREAM, 1, message(b"in flight"))
        probe.wait_for_calls(1)

        _write_config(config, pki, probe.port, allow_cn=["carol"])
        _sighup(sidecar, "CN=alice is no longer allowed")
        alice.call(3, UNARY, b"after")
        denied = alice.status(3)
        assert denied["grpc-status"] == str(grpc.StatusCode.PERMISSION_DENIED.value[0])
        assert "peer CN=alice is not allowed to call /probe.Probe/Unary" in denied["grpc-message"]
        gate.set()
        assert alice.status(1)["grpc-status"] == "0"
        assert alice.closed_within(10)
    assert len(probe.calls) == 1, "the call started after the reload reached the app"


def test_a_change_that_takes_a_restart_is_refused_whole(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """An upstream changed together with the rules: neither is applied, one ERROR names
    what takes a restart, and calls go on as before. A file that does not parse, or a
    route added, is refused the same way."""
    config = tmp_path / "sidecar.yaml"
    _write_config(config, pki, probe.port)
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    with sidecar.channel(pki, "alice") as alice:
        call = alice.unary_unary(UNARY)
        assert call(b"1", timeout=10) == b"1"

        _write_config(config, pki, probe.port + 1, allow_cn=["carol"])
        line = _sighup(sidecar, "config not reloaded, the running configuration stays")
        assert " ERROR " in line and "upstream changed: this takes a restart" in line, line
        assert call(b"2", timeout=10) == b"2"  # alice is still allowed: nothing was applied

        config.write_text("upstream: [unclosed\n")
        line = _sighup(sidecar, "config not reloaded, the running configuration stays")
        assert str(config) in line, line
        assert call(b"3", timeout=10) == b"3"

        _write_config(config, pki, probe.port, name="renamed")
        line = _sighup(sidecar, "config not reloaded, the running configuration stays")
        assert "route 'renamed' added; routes[0] removed: these take a restart" in line, line
        assert call(b"4", timeout=10) == b"4"
    assert not any("allowlist reloaded" in line for line in sidecar.lines), sidecar.output
    assert sidecar.proc.poll() is None


def test_reload_interval_applies_a_changed_config_file_without_sighup(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """The periodic check reads the config file too: new rules, a certificate file moved
    to a new path, and log_level apply without a signal; a broken file is reported once."""
    config = tmp_path / "sidecar.yaml"
    _write_config(config, pki, probe.port, reload_interval=0.2)
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    context = client_context(pki, "alice")
    first = _served_serial(sidecar.port, context)

    (tmp_path / "moved").mkdir()
    serial = pki.issue_server(tmp_path / "moved")
    _write_config(
        config, pki, probe.port, reload_interval=0.2, allow_cn=["carol"], log_level="debug",
        cert=str(tmp_path / "moved" / "server.pem"), key=str(tmp_path / "moved" / "server.key"),
    )  # fmt: skip
    sidecar.wait_for(f"credentials reloaded: certificate serial {serial:x}")
    assert serial != first and _served_serial(sidecar.port, context) == serial
    sidecar.wait_for("config reloaded: log_level debug, was info")
    sidecar.wait_for("allowlist reloaded: allow allow-cn=carol")
    with sidecar.channel(pki, "alice") as alice:
        assert _code(alice.unary_unary(UNARY), b"x") == grpc.StatusCode.PERMISSION_DENIED

    config.write_text("listen: 127.0.0.1:0\nupstream: [\n")
    sidecar.wait_for("config not reloaded, the running configuration stays")
    _write_config(config, pki, probe.port, reload_interval=0.2)  # alice allowed again
    sidecar.wait_for("allowlist reloaded: allow allow-cn=alice,carol")
    assert sum("config not reloaded" in line for line in sidecar.lines) == 1, sidecar.output
    with sidecar.channel(pki, "alice") as alice:
        assert alice.unary_unary(UNARY)(b"y", timeout=10) == b"y"


def test_new_credential_paths_not_there_yet_are_taken_once_they_are(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """The config file names certificate files that are not written yet: refused once (the
    current ones serve on), then taken by a later check as soon as they pass, with no
    signal and no second ERROR."""
    config = tmp_path / "sidecar.yaml"
    _write_config(config, pki, probe.port, reload_interval=0.2)
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    context = client_context(pki, "alice")
    first = _served_serial(sidecar.port, context)
    later = tmp_path / "later"
    _write_config(
        config, pki, probe.port, reload_interval=0.2,
        cert=str(later / "server.pem"), key=str(later / "server.key"),
    )  # fmt: skip
    sidecar.wait_for("credentials not reloaded, the current ones stay: .*no such file")
    assert _served_serial(sidecar.port, context) == first
    staging = tmp_path / "staging"  # both files appear at once (a directory renamed)
    staging.mkdir()
    serial = pki.issue_server(staging)
    staging.rename(later)
    sidecar.wait_for(f"credentials reloaded: certificate serial {serial:x}")
    assert _served_serial(sidecar.port, context) == serial
    assert sum("not reloaded" in line for line in sidecar.lines) == 1, sidecar.output


def test_a_revoked_callers_calls_in_flight_end_after_the_drain_grace(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """A call that would never end (a watch, a session stream) does not keep a revoked
    caller in: after drain_grace it ends PERMISSION_DENIED, and the app's call is cancelled."""
    config = tmp_path / "sidecar.yaml"
    _write_config(config, pki, probe.port, drain_grace=0.5)
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    with sidecar.channel(pki, "alice") as alice:
        endless = alice.unary_unary(UNARY).future(
            b"x", timeout=60, metadata=[("x-probe-gate", "never")]
        )
        (seen,) = probe.wait_for_calls(1)
        _write_config(config, pki, probe.port, drain_grace=0.5, allow_cn=["carol"])
        _sighup(sidecar, "CN=alice is no longer allowed")
        with pytest.raises(grpc.RpcError) as ended:
            endless.result(timeout=30)
    assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no longer allowed" in str(ended.value.details())
    assert seen.woke.wait(10) and seen.cancelled, "the app's call must be cancelled too"


def test_a_revoked_caller_has_denied_calls_answers_then_its_connection_ends(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """A revoked caller that keeps starting calls (ignoring the GOAWAY) gets denied_calls
    answers, as a caller denied from the start does, then its connection ends, even with a
    call in flight and the drain grace not over."""
    config = tmp_path / "sidecar.yaml"
    _write_config(config, pki, probe.port, drain_grace=60, denied_calls=3)
    sidecar = sidecars.start("--config", str(config), default_tls=False, listen=None)
    sidecar.wait_ready()
    with RawPeer(sidecar.port, pki, "alice") as alice:
        alice.settle()
        block = request_block(UNARY, (("x-probe-gate", "never"),))
        alice.send_frame(HEADERS, END_HEADERS, 1, block)
        alice.send_frame(DATA, END_STREAM, 1, message(b"in flight"))
        probe.wait_for_calls(1)
        _write_config(config, pki, probe.port, drain_grace=60, denied_calls=3, allow_cn=["carol"])
        _sighup(sidecar, "CN=alice is no longer allowed")
        for stream in (3, 5, 7):
            alice.call(stream, UNARY, b"again")
            assert alice.status(stream)["grpc-status"] == "7"
        assert alice.status(1)["grpc-status"] == "7"  # the call in flight, cut
        assert alice.closed_within(10)
    assert len(probe.calls) == 1
