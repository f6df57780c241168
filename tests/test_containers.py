"""The Dockerfile, compose.yaml and Kubernetes manifests, checked statically, and the commands
they run executed here (Docker itself cannot run on these machines)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import tomllib
import yaml
from dockerfile_parse import DockerfileParser

from sidecar.config.settings import BY_KEY
from tests.conftest import ROOT, SidecarProcess
from tests.probe import Probe

SETTING_VARIABLES = {setting.env_name for setting in BY_KEY.values() if setting.flag}


def dockerfile() -> list[dict[str, str]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return parser.structure  # type: ignore[no-any-return]


def final_stage() -> list[dict[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, item in enumerate(instructions) if item["instruction"] == "FROM")
    return instructions[last_from:]


def test_the_image_runs_the_sidecar_as_a_non_root_user_with_a_healthcheck() -> None:
    stage = {item["instruction"]: item["value"] for item in final_stage()}
    assert stage["ENTRYPOINT"] == '["sidecar"]'
    assert stage["USER"] == "10001:10001"
    assert "HEALTHCHECK" in stage
    assert stage["STOPSIGNAL"] == "SIGTERM"
    froms = [item["value"] for item in dockerfile() if item["instruction"] == "FROM"]
    assert len(froms) >= 3, "multi-stage: build, certs, and the image that runs"


def test_dependencies_are_installed_in_a_layer_before_the_code() -> None:
    lines = [f"{item['instruction']} {item['value']}" for item in dockerfile()]
    deps = next(i for i, line in enumerate(lines) if "pip install -r requirements.txt" in line)
    code = next(i for i, line in enumerate(lines) if line.startswith("COPY sidecar"))
    assert lines.index("COPY pyproject.toml ./") < deps < code


def test_the_requirements_command_lists_the_pinned_dependencies(tmp_path: Path) -> None:
    run = next(item["value"] for item in dockerfile() if "requirements.txt" in item["value"])
    command = run.split(" > requirements.txt")[0]  # the python -c part, run as the image would
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    listed = subprocess.run(
        ["sh", "-c", command], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert listed == pinned


def test_the_ca_key_is_only_ever_a_build_secret() -> None:
    for item in dockerfile():
        if item["instruction"] in ("COPY", "ADD"):
            assert ".key" not in item["value"], item["value"]
    provision = next(
        item["value"]
        for item in dockerfile()
        if item["instruction"] == "RUN" and "certs provision" in item["value"]
    )
    assert "--mount=type=secret,id=ca_key" in provision
    assert "--ca-key /run/secrets/ca_key" in provision


def provision(
    out: Path, ca: Path, role: str, auth: str = "true"
) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's build-time issuance, as its RUN line calls it."""
    env = {
        **os.environ,
        "AUTH": auth,
        "CLIENT_AUTH": "true",
        "ROLE": role,
        "COMMON_NAME": "app" if role == "server" else "web",
    }
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "certs", "provision", "--ca-cert", str(ca / "ca.pem"),
         "--ca-key", str(ca / "ca.key"), "--name", "tls", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip


def make_ca(directory: Path) -> Path:
    ca = directory / "ca"
    subprocess.run(
        [sys.executable, "-m", "sidecar", "certs", "init-ca", "--out", str(ca)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return ca


def image_config(directory: Path, role: str, port: str, upstream: str) -> Path:
    """The image's sidecar.yaml as config/docker.sh writes it, with its paths moved here."""
    written = subprocess.run(
        ["sh", str(ROOT / "config" / "docker.sh"), role, port, upstream],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = directory / "sidecar.yaml"
    path.write_text(written.replace("/etc/sidecar/tls", str(directory / "tls")))
    return path


def check(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "--check-config"],
        cwd=ROOT, env={**os.environ, "SIDECAR_CONFIG": str(config), **env},
        capture_output=True, text=True,
    )  # fmt: skip


def test_a_server_image_issued_at_build_time_serves_as_ingress(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    issued = provision(tmp_path / "tls", ca, "server")
    assert issued.returncode == 0 and "signed server certificate" in issued.stdout, issued
    (tmp_path / "tls" / "ca.pem").write_bytes((ca / "ca.pem").read_bytes())  # the RUN's cp
    config = image_config(tmp_path, "server", "8443", "localhost:50051")
    refused = check(config)  # deny by default: the image needs its allowlist at run time
    assert refused.returncode == 2 and "no allow rule" in refused.stderr
    checked = check(config, SIDECAR_ALLOW_CN="web")
    assert checked.returncode == 0, checked.stderr
    assert "mode: ingress  # file" in checked.stdout
    assert "listen: 0.0.0.0:8443  # file" in checked.stdout


def test_a_client_image_serves_as_egress_once_given_its_remote(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    assert provision(tmp_path / "tls", ca, "client").returncode == 0
    (tmp_path / "tls" / "ca.pem").write_bytes((ca / "ca.pem").read_bytes())
    config = image_config(tmp_path, "client", "50052", "unused")
    missing = check(config)
    assert missing.returncode == 2 and "missing upstream" in missing.stderr
    checked = check(config, SIDECAR_UPSTREAM="app:8443", SIDECAR_SERVER_NAME="app")
    assert checked.returncode == 0, checked.stderr
    assert "listen: 127.0.0.1:50052  # file" in checked.stdout


def test_an_image_built_without_auth_issues_nothing(tmp_path: Path) -> None:
    result = provision(tmp_path / "tls", tmp_path / "no-ca", "server", auth="false")
    assert result.returncode == 0, result.stderr
    assert "not signing: AUTH=false" in result.stdout
    assert not (tmp_path / "tls").exists() or not any((tmp_path / "tls").iterdir())


def compose() -> dict[str, dict[str, dict[str, object]]]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())  # type: ignore[no-any-return]


def test_compose_sidecars_share_their_apps_network_namespace() -> None:
    services = compose()["services"]
    assert services["app-sidecar"]["network_mode"] == "service:app"
    assert services["web-sidecar"]["network_mode"] == "service:web"
    app_command = services["app"]["command"]
    assert app_command[app_command.index("--listen") + 1].startswith("127.0.0.1:")
    assert services["app"]["ports"] == ["8443:8443"]  # the mTLS port only, never 50051
    for name in ("app-sidecar", "web-sidecar"):
        environment = services[name]["environment"]
        assert isinstance(environment, dict)
        assert set(environment) <= SETTING_VARIABLES, set(environment) - SETTING_VARIABLES
        assert services[name]["volumes"] == ["certs:/certs:ro"]


def test_compose_certs_and_sidecar_settings_work_as_written(tmp_path: Path) -> None:
    services = compose()["services"]
    script = services["certs"]["command"][0]  # type: ignore[index]
    script = script.replace("/certs", str(tmp_path)).replace("chown -R 10001:10001", "true")
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        ["sh", "-ec", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        check=True, capture_output=True,
    )  # fmt: skip
    for name, role, port in (("app-sidecar", "server", "8443"), ("web-sidecar", "client", "50052")):
        args = services[name]["build"]["args"]  # type: ignore[index]
        assert args["ROLE"] == role and args["PORT"] == port
        config = image_config(tmp_path, role, port, args.get("UPSTREAM", "localhost:50051"))
        env = {
            key: str(value).replace("/certs", str(tmp_path))
            for key, value in services[name]["environment"].items()  # type: ignore[union-attr]
        }
        checked = check(config, **env)
        assert checked.returncode == 0, checked.stderr


def test_kubernetes_runs_the_sidecar_as_a_native_sidecar_with_read_only_certificates() -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "app.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    service = next(d for d in documents if d["kind"] == "Service")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "sidecar")
    assert sidecar["restartPolicy"] == "Always"
    env = {item["name"]: item["value"] for item in sidecar["env"]}
    assert set(env) <= SETTING_VARIABLES
    assert pod["terminationGracePeriodSeconds"] > float(env["SIDECAR_DRAIN_GRACE"])
    mount = sidecar["volumeMounts"][0]
    assert mount["readOnly"] is True
    assert env["SIDECAR_CERT"].startswith(mount["mountPath"])
    assert "secret" in next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert sidecar["readinessProbe"] and sidecar["livenessProbe"]
    listen_port = int(env["SIDECAR_LISTEN"].rpartition(":")[2])
    assert sidecar["ports"][0]["containerPort"] == listen_port
    assert service["spec"]["ports"][0]["port"] == listen_port
    app = next(c for c in pod["containers"] if c["name"] == "app")
    assert app["command"][app["command"].index("--listen") + 1].startswith("127.0.0.1:")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", env["SIDECAR_UPSTREAM"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run_probe(command: list[str], admin: str) -> int:
    """A health-check command as the image or the kubelet runs it (`sidecar` on PATH)."""
    assert command[0] == "sidecar", command
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *command[1:]],
        cwd=ROOT, env={**os.environ, "SIDECAR_ADMIN": admin},
        capture_output=True, text=True, timeout=30,
    ).returncode  # fmt: skip


def _eventually_exits(command: list[str], admin: str, code: int) -> None:
    """Run the probe until it exits with code (the sidecar probes its app each second)."""
    deadline = time.monotonic() + 20
    while _run_probe(command, admin) != code:
        assert time.monotonic() < deadline, f"{command} never exited {code}"


def test_the_images_health_check_and_the_pods_probes_ask_the_admin_listener(
    tmp_path: Path, probe: Probe
) -> None:
    """The image's HEALTHCHECK and the manifest's probes, run against the image's own
    configuration: healthy while the app answers, unhealthy when it does not."""
    stage = {item["instruction"]: item["value"] for item in final_stage()}
    healthcheck = json.loads(stage["HEALTHCHECK"].split("CMD", 1)[1])
    env_line = next(item["value"] for item in final_stage() if item["instruction"] == "ENV")
    assert "SIDECAR_ADMIN=127.0.0.1:9901" in env_line  # the check's address, on loopback
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "app.yaml").read_text()))
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    sidecar_container = next(c for c in pod["initContainers"] if c["name"] == "sidecar")
    probes = {kind: sidecar_container[kind]["exec"]["command"]
              for kind in ("startupProbe", "readinessProbe", "livenessProbe")}  # fmt: skip

    ca = make_ca(tmp_path)
    assert provision(tmp_path / "tls", ca, "server").returncode == 0
    (tmp_path / "tls" / "ca.pem").write_bytes((ca / "ca.pem").read_bytes())
    config = image_config(tmp_path, "server", "8443", f"127.0.0.1:{probe.port}")
    admin = f"127.0.0.1:{_free_port()}"
    env = {"SIDECAR_CONFIG": str(config), "SIDECAR_ALLOW_CN": "web",
           "SIDECAR_LISTEN": "127.0.0.1:0", "SIDECAR_ADMIN": admin}  # fmt: skip
    sidecar = SidecarProcess([], env={**os.environ, **env})
    try:
        sidecar.wait_ready()
        _eventually_exits(healthcheck, admin, 0)
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert _run_probe(probes[kind], admin) == 0, kind
        probe.stop()  # the app goes away: not ready, still alive
        _eventually_exits(healthcheck, admin, 1)
        assert _run_probe(probes["readinessProbe"], admin) == 1
        assert _run_probe(probes["livenessProbe"], admin) == 0
    finally:
        sidecar.stop()
