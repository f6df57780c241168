"""One configuration tree: a YAML file, SIDECAR_* variables and flags, with one precedence.

Each error case starts from one good configuration and changes one thing; the
sidecar must exit 2 with one line naming where the setting at fault came from.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import grpc
import pytest
import yaml

from sidecar.config.settings import SETTINGS
from tests.conftest import ROOT, Pki, SidecarFactory, SidecarProcess, assert_config_error
from tests.probe import Probe

UNARY = "/probe.Probe/Unary"


def write(directory: Path, text: str, name: str = "sidecar.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def call(process: SidecarProcess, pki: Pki, client: str) -> grpc.StatusCode:
    with process.channel(pki, client) as channel:
        try:
            channel.unary_unary(UNARY)(b"x", timeout=10)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def route_port(process: SidecarProcess, name: str) -> int:
    found = process.wait_for(rf"route '{name}' \(\w+\) listening on [^\s]+:(\d+)")
    return int(found.group(1))


def test_two_ingress_routes_and_an_egress_route_serve_from_one_process(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    remote = sidecars.serving(probe.port, "--allow-cn", "alice")
    ca = pki.dir / "ca.pem"
    config = write(
        tmp_path,
        f"""\
        routes:
          - name: open
            listen: 127.0.0.1:0
            upstream: 127.0.0.1:{probe.port}
            cert: {pki.cert("server")}
            key: {pki.key("server")}
            ca: {ca}
            allow_cn: [alice]
          - name: strict
            listen: 127.0.0.1:0
            upstream: 127.0.0.1:{probe.port}
            cert: {pki.cert("server")}
            key: {pki.key("server")}
            ca: {ca}
            allow_uri: ["spiffe://example.org/ns/prod/**"]
          - name: out
            mode: egress
            listen: 127.0.0.1:0
            upstream: 127.0.0.1:{remote.port}
            cert: {pki.cert("alice")}
            key: {pki.key("alice")}
            ca: {ca}
        """,
    )
    process = sidecars.start("--config", str(config), default_tls=False, listen=None)
    ports = {name: route_port(process, name) for name in ("open", "strict", "out")}

    process.port = ports["open"]
    assert call(process, pki, "alice") == grpc.StatusCode.OK
    process.port = ports["strict"]
    assert call(process, pki, "alice") == grpc.StatusCode.PERMISSION_DENIED
    assert call(process, pki, "carol") == grpc.StatusCode.OK
    with grpc.insecure_channel(f"127.0.0.1:{ports['out']}") as channel:
        assert channel.unary_unary(UNARY)(b"out", timeout=10) == b"out"
    remote.wait_for(r"/probe.Probe/Unary peer='CN=alice'.* code=OK")
    process.wait_for(r"/probe.Probe/Unary route=strict peer='CN=carol.* code=OK")
    process.wait_for(r"/probe.Probe/Unary route=out peer='-'.* code=OK")


def test_precedence_is_flags_then_environment_then_file_then_defaults(
    sidecars: SidecarFactory, pki: Pki, tmp_path: Path
) -> None:
    document = single(pki, listen=None, allow_cn=["mallory"], log_level="warning", drain_grace=5)
    config = write(tmp_path, yaml.safe_dump(document))
    result = sidecars.run(
        "--config",
        str(config),
        "--check-config",
        "--log-level",
        "debug",
        env={"SIDECAR_LOG_LEVEL": "error", "SIDECAR_ALLOW_CN": "alice,bob"},
    )
    assert result.returncode == 0, result.stderr
    effective = result.stdout
    assert "log_level: debug  # --log-level" in effective  # flag beats env and file
    assert "allow_cn: [alice, bob]  # SIDECAR_ALLOW_CN" in effective  # env beats file
    assert "drain_grace: 5.0  # file" in effective
    assert "listen: 0.0.0.0:8443  # default" in effective
    assert yaml.safe_load(effective)["allow_cn"] == ["alice", "bob"]


def test_environment_overrides_the_file_when_serving(
    sidecars: SidecarFactory, pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    config = write(tmp_path, f"upstream: 127.0.0.1:{probe.port}\nallow_cn: [mallory]\n")
    process = sidecars.start("--config", str(config), env={"SIDECAR_ALLOW_CN": "alice"})
    process.wait_ready()
    assert call(process, pki, "alice") == grpc.StatusCode.OK
    assert call(process, pki, "mallory") == grpc.StatusCode.PERMISSION_DENIED


def test_pem_contents_in_environment_variables_are_used_and_the_key_never_printed(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    key_text = pki.key("server").read_text()
    env = {
        "SIDECAR_UPSTREAM": f"127.0.0.1:{probe.port}",
        "SIDECAR_CERT": pki.cert("server").read_text(),
        "SIDECAR_KEY": key_text,
        "SIDECAR_CA": (pki.dir / "ca.pem").read_text(),
        "SIDECAR_ALLOW_CN": "alice",
    }
    checked = sidecars.run("--check-config", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "key: <inline private key, redacted>  # SIDECAR_KEY" in checked.stdout
    assert "cert: <inline PEM>  # SIDECAR_CERT; CN=localhost" in checked.stdout
    body = key_text.splitlines()[1]
    assert body not in checked.stdout + checked.stderr

    process = sidecars.start("--listen", "127.0.0.1:0", env=env, default_tls=False)
    process.wait_ready()
    assert call(process, pki, "alice") == grpc.StatusCode.OK
    assert body not in process.output


def test_inline_pem_in_the_file_and_paths_relative_to_the_file(
    sidecars: SidecarFactory, pki: Pki, tmp_path: Path
) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "server.pem").write_bytes(pki.cert("server").read_bytes())
    ca_block = textwrap.indent((pki.dir / "ca.pem").read_text(), "  ")
    config = write(
        tmp_path,
        "upstream: 127.0.0.1:50051\n"
        "cert: tls/server.pem\n"
        f"key: {pki.key('server')}\n"
        f"ca: |\n{ca_block}"
        "allow_cn: alice\n",
    )
    result = sidecars.run("--config", str(config), "--check-config")  # cwd is the repo root
    assert result.returncode == 0, result.stderr
    assert f"cert: {tmp_path / 'tls' / 'server.pem'}  # file" in result.stdout
    assert "ca: <inline PEM>  # file" in result.stdout
    assert "allow_cn: [alice]  # file" in result.stdout


def test_the_example_config_documents_every_key_and_is_valid(
    sidecars: SidecarFactory, tmp_path: Path
) -> None:
    example = (ROOT / "config" / "sidecar.example.yaml").read_text()
    # spiffe_socket replaces cert, key and ca: it is shown commented out, as the alternative.
    alternatives = {"spiffe_socket"}
    for setting in SETTINGS:
        commented = r"#\s*" if setting.key in alternatives else ""
        pattern = rf"^\s*{commented}(- )?{setting.key}:"
        assert re.search(pattern, example, re.MULTILINE), setting.key
    # The example refers to certs/ next to it: make them with the sidecar's own tool.
    certs = tmp_path / "certs"
    for command in (
        ["init-ca", "--out", str(certs)],
        ["issue", "--ca", str(certs), "--cn", "server", "--server", "--out", str(certs)],
        ["issue", "--ca", str(certs), "--cn", "client", "--client", "--out", str(certs)],
        ["crl", "--ca", str(certs), "--out", str(certs / "ca.crl")],
    ):
        made = sidecars.run("certs", *command)
        assert made.returncode == 0, made.stderr
    copy = write(tmp_path, example, "sidecar.example.yaml")
    result = sidecars.run("--config", str(copy), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "- name: billing-egress  # file" in result.stdout


def test_unknown_sidecar_variables_are_warned_about_not_fatal(
    sidecars: SidecarFactory, probe: Probe
) -> None:
    # Kubernetes sets SIDECAR_SERVICE_HOST for a service named "sidecar".
    env = {"SIDECAR_SERVICE_HOST": "10.0.0.1", "SIDECAR_ALOW_CN": "bob"}
    process = sidecars.serving(probe.port, "--allow-cn", "alice", env=env)
    process.wait_for("WARNING .*ignoring SIDECAR_SERVICE_HOST: not a setting")
    process.wait_for(r"ignoring SIDECAR_ALOW_CN: not a setting \(did you mean SIDECAR_ALLOW_CN\?\)")
    assert process.port


def test_a_start_up_failure_names_the_misspelled_variable_it_may_come_from(
    sidecars: SidecarFactory,
) -> None:
    """SIDECAR_ALOW_CN is ignored, so no allow rule is given: the error says so, and the
    note names the variable (an orchestrator's own SIDECAR_ variables are not named)."""
    env = {"SIDECAR_SERVICE_HOST": "10.0.0.1", "SIDECAR_ALOW_CN": "alice"}
    result = sidecars.run("--upstream", "127.0.0.1:1", *sidecars.tls_args(), env=env)
    assert result.returncode == 2
    error, note = result.stderr.strip().splitlines()
    assert error.startswith("sidecar: config error: no allow rule: give --allow-cn"), error
    assert note == (
        "sidecar: note: ignoring SIDECAR_ALOW_CN: not a setting (did you mean SIDECAR_ALLOW_CN?)"
    )


def test_a_start_up_failure_with_no_misspelling_is_one_line(sidecars: SidecarFactory) -> None:
    env = {"SIDECAR_SERVICE_HOST": "10.0.0.1"}
    result = sidecars.run("--upstream", "127.0.0.1:1", *sidecars.tls_args(), env=env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def single(pki: Pki, **change: object) -> dict[str, object]:
    """The good one-route file, changed: a value of None removes the key."""
    document: dict[str, object] = {
        "upstream": "127.0.0.1:50051",
        "listen": "127.0.0.1:0",
        "cert": str(pki.cert("server")),
        "key": str(pki.key("server")),
        "ca": str(pki.dir / "ca.pem"),
        "allow_cn": ["alice"],
    }
    document.update(change)
    return {key: value for key, value in document.items() if value is not None}


def several(pki: Pki, *changes: dict[str, object], **top: object) -> dict[str, object]:
    """A good file with one route per change (names a, b, ...), changed likewise."""
    routes = []
    for index, change in enumerate(changes):
        route = single(pki, name="abcdef"[index])
        route.update(change)
        routes.append({key: value for key, value in route.items() if value is not None})
    return {**top, "routes": routes}


Case = dict[str, object] | str

CASES: list[tuple[str, object, list[str]]] = [
    ("unknown key", lambda p: single(p, upstrem="x"), ["upstrem: unknown setting", "upstream?"]),
    (
        "unknown route key",
        lambda p: several(p, {}, {"alow_cn": ["bob"]}),
        ["sidecar.yaml: routes[1].alow_cn: unknown setting (did you mean allow_cn?)"],
    ),
    ("list type", lambda p: single(p, allow_cn=5), ["allow_cn: expected a list of strings"]),
    ("bool type", lambda p: single(p, allow_all="maybe"), ["allow_all: expected true or false"]),
    ("number type", lambda p: single(p, drain_grace="soon"), ["drain_grace: expected a number"]),
    ("string type", lambda p: single(p, listen=8443), ["listen: expected a string like"]),
    ("bad address", lambda p: single(p, upstream="localhost"), ["upstream: expected HOST:PORT"]),
    ("bad choice", lambda p: single(p, log_format="xml"), ["'xml' is not one of text, json"]),
    ("missing file", lambda p: single(p, cert="nope.pem"), ["cert: no such file", "nope.pem"]),
    ("key mismatch", lambda p: single(p, key=str(p.key("alice"))), ["key does not match"]),
    ("allow-all conflict", lambda p: single(p, allow_all=True), ["allow_all cannot be combined"]),
    ("no rule", lambda p: single(p, allow_cn=None), ["no allow rule"]),
    (
        "not loopback",
        lambda p: single(p, upstream="192.0.2.1:50051"),
        ["upstream 192.0.2.1:50051 is not on loopback", "unsafe_upstream"],
    ),
    ("ingress server_name", lambda p: single(p, server_name="x"), ["applies to egress"]),
    (
        "egress allowlist",
        lambda p: single(p, mode="egress", cert=str(p.cert("alice")), key=str(p.key("alice"))),
        ["allow_cn applies to ingress routes only"],
    ),
    (
        "egress server certificate",
        lambda p: single(p, mode="egress", allow_cn=None),
        ["lacks the clientAuth extended key usage"],
    ),
    (
        "egress open listener",
        lambda p: single(
            p,
            mode="egress",
            allow_cn=None,
            listen="0.0.0.0:0",
            cert=str(p.cert("alice")),
            key=str(p.key("alice")),
        ),
        ["listen 0.0.0.0:0 is not on loopback", "unsafe_listen"],
    ),
    (
        "route key at top level",
        lambda p: several(p, {}, upstream="127.0.0.1:1"),
        ["upstream: with routes:, route settings go inside each route"],
    ),
    (
        "process key in a route",
        lambda p: several(p, {"log_level": "debug"}),
        ["routes[0].log_level: log_level is process-wide"],
    ),
    ("same names", lambda p: several(p, {}, {"name": "a"}), ["'a' names two routes"]),
    (
        "same listener",
        lambda p: several(p, {"listen": "127.0.0.1:7001"}, {"listen": "127.0.0.1:7001"}),
        ["routes[1].listen: 127.0.0.1:7001 is also", "each route needs its own listener"],
    ),
    ("no routes", lambda p: {"routes": []}, ["routes: expected a non-empty list"]),
    (
        "route missing keys",
        lambda p: {"routes": [{"upstream": "127.0.0.1:1"}]},
        ["sidecar.yaml: routes[0]: missing cert, key, ca"],
    ),
    ("routes null", lambda p: {"routes": None}, ["routes: expected a non-empty list"]),
    ("empty name", lambda p: single(p, allow_cn=["alice", " "]), ["allow_cn: empty name"]),
    ("count type", lambda p: single(p, reset_rate=1.5), ["reset_rate: expected a whole number"]),
    (
        "pattern not ascii",
        lambda p: single(p, allow_dns=["adm\u0131n.example.com"]),
        ["allow_dns: 'adm\u0131n.example.com' is not printable ASCII"],
    ),
    ("zero count", lambda p: single(p, max_connections=0), ["max_connections: 0 must be at least"]),
    (
        "limit the grpc plane lacks",
        lambda p: single(p, data_plane="grpc", reset_rate=50),
        ["reset_rate applies to data_plane splice only"],
    ),
    ("nan seconds", lambda p: single(p, drain_grace=float("nan")), ["drain_grace: nan seconds"]),
    ("huge seconds", lambda p: single(p, drain_grace=1e400), ["drain_grace: inf seconds"]),
    (
        "a busy reload period",
        lambda p: single(p, reload_interval=0.001),
        ["reload_interval: 0.001 seconds is too short (at least 0.1; 0: off)"],
    ),
    (
        "key given twice",
        lambda p: "allow_cn: [alice]\nallow_cn: [bob]\n",
        ["sidecar.yaml: 'allow_cn' is given twice at line 2"],
    ),
    ("yaml syntax", lambda p: "allow_cn: [alice\n", ["sidecar.yaml:", "line 2"]),
    ("not a mapping", lambda p: "- upstream\n", ["expected a mapping of settings, got list"]),
]


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_file_exits_2_naming_the_key(
    sidecars: SidecarFactory, pki: Pki, tmp_path: Path, make: object, expected: list[str]
) -> None:
    document = make(pki)  # type: ignore[operator]
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    path = write(tmp_path, text)
    assert_config_error(sidecars, ["--config", str(path)], *expected)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--config", "/nonexistent/sidecar.yaml"], {}, ["--config: no such file"]),
        (["--config", "/dev/zero"], {}, ["--config: /dev/zero is not a regular file"]),
        ([], {"SIDECAR_ALLOW_CN": ""}, ["SIDECAR_ALLOW_CN: empty; unset it"]),
        (["--allow-cn", ""], {}, ["--allow-cn: empty name in the list"]),
        ([], {"SIDECAR_CONFIG": "/nonexistent/s.yaml"}, ["--config: no such file"]),
        (["--upstrem", "x"], {}, ["unrecognized arguments: --upstrem", "did you mean --upstream?"]),
        ([], {"SIDECAR_ALLOW_ALL": "yes"}, ["SIDECAR_ALLOW_ALL: expected true or false"]),
        ([], {"SIDECAR_UPSTREAM": "nope"}, ["SIDECAR_UPSTREAM: expected HOST:PORT"]),
        ([], {"SIDECAR_DRAIN_GRACE": "-3"}, ["SIDECAR_DRAIN_GRACE: -3 must not be negative"]),
        (["--max-header-fields", "many"], {}, ["--max-header-fields: expected a whole number"]),
        (["--mode", "egress", "--upstream", "127.0.0.1:1"], {}, ["missing --listen"]),
        (
            ["--mode", "egress", "--listen", "127.0.0.1:0", "--upstream", "unix:/run/x.sock"],
            {},
            ["--upstream: an egress upstream is a remote HOST:PORT"],
        ),
        ([], {}, ["missing --upstream, --cert, --key, --ca (flags, SIDECAR_* variables or a"]),
    ],
)
def test_bad_flags_and_variables_exit_2_naming_them(
    sidecars: SidecarFactory, pki: Pki, args: list[str], env: dict[str, str], expected: list[str]
) -> None:
    if "--mode" in args:
        args = [*args, "--cert", str(pki.cert("alice")), "--key", str(pki.key("alice"))]
        args += ["--ca", str(pki.dir / "ca.pem")]
    assert_config_error(sidecars, args, *expected, env=env)


def test_route_flags_are_refused_with_a_file_of_several_routes(
    sidecars: SidecarFactory, pki: Pki, tmp_path: Path
) -> None:
    path = write(tmp_path, yaml.safe_dump(several(pki, {})))
    assert_config_error(
        sidecars,
        ["--config", str(path), "--allow-cn", "bob"],
        f"--allow-cn: {path} declares routes:, so allow_cn must be set inside each route",
    )
    assert_config_error(
        sidecars,
        ["--config", str(path)],
        "SIDECAR_UPSTREAM:",
        env={"SIDECAR_UPSTREAM": "127.0.0.1:1"},
    )


def test_errors_never_echo_pem_text(sidecars: SidecarFactory, pki: Pki, tmp_path: Path) -> None:
    key_text = pki.key("server").read_text()
    secret = key_text.splitlines()[1]
    as_list = write(tmp_path, yaml.safe_dump({**single(pki), "key": key_text.splitlines()}))
    for args, expected in (
        (["--kye", key_text], "unrecognized arguments: --kye <PEM text, not shown>"),
        (["--upstream", key_text], "--upstream: expected HOST:PORT, got '<PEM text, not shown>"),
        (["--config", str(as_list)], "key: expected a string (a path or PEM text), got list"),
    ):
        line = assert_config_error(sidecars, args, expected)
        assert secret not in line


def test_pem_that_only_a_lenient_parser_reads_still_serves(
    sidecars: SidecarFactory, pki: Pki, probe: Probe
) -> None:
    # A key folded onto one line (a YAML value without `|`, or `tr '\\n' ' '`): the
    # sidecar accepts it, so it must also work in the handshake.
    folded = " ".join(pki.key("alice").read_text().split("\n"))
    ingress = sidecars.serving(probe.port, "--allow-cn", "alice")
    egress = sidecars.egress(ingress.port, "--key", folded)
    with grpc.insecure_channel(f"127.0.0.1:{egress.port}") as channel:
        assert channel.unary_unary(UNARY)(b"folded", timeout=10) == b"folded"
