"""A client not written in Python (@grpc/grpc-js on Node.js) drives the relay via the sidecar."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Pki, SidecarProcess, install_debian_packages

# On a fresh machine the fixtures first install Node.js and run npm ci: minutes, not
# the default 120 s.
pytestmark = pytest.mark.timeout(1200)

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node() -> str:
    install_debian_packages(["nodejs", "npm"], ["node", "npm"])
    executable = shutil.which("node")
    assert executable is not None
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return executable


def run_client(node: str, sidecar: SidecarProcess, pki: Pki, client: str) -> dict[str, Any]:
    """Run client.js through the sidecar with client certificate `client`; its JSON report."""
    result = subprocess.run(
        [
            node,
            "client.js",
            f"127.0.0.1:{sidecar.port}",
            str(pki.dir / "ca.pem"),
            str(pki.cert(client)),
            str(pki.key(client)),
        ],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_grpc_js_client_unary_server_stream_and_error_with_trailers(
    node: str, sidecar: SidecarProcess, pki: Pki
) -> None:
    outcome = run_client(node, sidecar, pki, "alice")
    assert outcome["unary"] == {"code": 0, "reply": "from node"}
    assert outcome["serverStream"] == {"code": 0, "replies": ["n0", "n1", "n2"]}
    error = outcome["error"]
    assert error["code"] == 5  # NOT_FOUND, from the upstream, unchanged
    assert error["details"] == "no such key"
    assert error["trailers"]["x-up-trail"] == "bye"
    assert error["trailers"]["x-up-trail-bin"] == "00ff10"


def test_grpc_js_client_that_is_not_allowed_gets_permission_denied(
    node: str, sidecar: SidecarProcess, pki: Pki
) -> None:
    unary = run_client(node, sidecar, pki, "mallory")["unary"]
    assert unary["code"] == 7  # PERMISSION_DENIED
    assert unary["details"] == "peer CN=mallory is not allowed to call /probe.Probe/Unary"
