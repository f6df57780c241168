"""The demo: generated code in step with protos/, the app, the client, and `make demo` itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import grpc

from demo.gen import kv_pb2, kv_pb2_grpc
from tests.conftest import ROOT, start_demo_app


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    protos = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "protos").glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Idemo/gen=protos",
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
         *protos],
        cwd=ROOT,
        check=True,
    )  # fmt: skip
    fresh = {path.name: path.read_bytes() for path in (tmp_path / "demo" / "gen").iterdir()}
    committed = {
        path.name: path.read_bytes()
        for path in (ROOT / "demo" / "gen").iterdir()
        if path.name.endswith((".py", ".pyi")) and path.name != "__init__.py"
    }
    assert fresh == committed, "demo/gen is stale: run `make protos`"


def test_make_demo_secures_the_whole_path_and_stops_everything() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo.run"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for expected in (
        "ok (previous: 'blue')",
        "error: NOT_FOUND: no key 'colour'",
        "> add 2 40\n    42",
        "cpu{host=app}",
        "error: PERMISSION_DENIED: peer CN=intruder",
        "demo finished",
    ):
        assert expected in output, output
    # The ingress's access log: its line for the session's first call, and the refusal's.
    allowed = r"INFO sidecar\.access: /kv\.KV/Put peer='CN=demo-client.*' .* code=OK "
    denied = r"sidecar\.access: /kv\.KV/Get peer='CN=intruder.*code=PERMISSION_DENIED"
    assert re.search(allowed, output), output
    assert re.search(denied, output), output
    # Every sidecar it started drained and stopped: the ingress and both egresses.
    assert output.count("INFO sidecar.server: stopped") == 3, output


def test_client_answers_bad_commands_with_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo.client", "--target", "127.0.0.1:1"],
        cwd=ROOT,
        input="frobnicate\nput lonely\nadd two 3\nexit\nget never-sent\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "unknown command 'frobnicate'" in result.stdout
    assert "usage error: wrong number of arguments for put" in result.stdout
    assert "usage error: add takes two integers" in result.stdout
    assert "never-sent" not in result.stdout  # nothing after exit is run


def test_the_store_survives_a_restart_and_writes_atomically(tmp_path: Path) -> None:
    data = tmp_path / "kv.json"
    app = start_demo_app(data)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = kv_pb2_grpc.KVStub(channel)
            first = stub.Put(kv_pb2.PutRequest(key="k", value="v1"), timeout=10)
            second = stub.Put(kv_pb2.PutRequest(key="k", value="v2"), timeout=10)
            gone = stub.Delete(kv_pb2.DeleteRequest(key="missing"), timeout=10)
    finally:
        app.stop()
    assert not first.HasField("previous")
    assert second.previous == "v1"
    assert not gone.HasField("previous")  # deleting a missing key is not an error
    assert json.loads(data.read_text()) == {"k": "v2"}
    assert [path.name for path in tmp_path.iterdir()] == ["kv.json"]  # no temporary left

    app = start_demo_app(data)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            reply = kv_pb2_grpc.KVStub(channel).Get(kv_pb2.GetRequest(key="k"), timeout=10)
    finally:
        app.stop()
    assert reply.value == "v2"
