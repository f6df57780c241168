"""The README's quick start, run as written: its commands in a fresh directory, then its two
calls, whose output must be what the README shows (dates aside).

The directory stands for the repository a reader works in: `.venv` and `demo` are links to
this one's. The commands listen on the README's fixed ports, 50051 and 8443.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DEMO_APP_LISTENING, LISTENING, ROOT, ChildProcess

README = ROOT / "README.md"
_BACKGROUND = re.compile(r"\s*&\s*(#.*)?$")
_VARYING = [
    (re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC"), "<time> UTC"),
    (re.compile(r"\(\d+ days left\)"), "(<n> days left)"),
]


def block(marker: str) -> str:
    """The fenced block after `<!-- quick-start: marker`, without its fences."""
    after = README.read_text().split(f"<!-- quick-start: {marker}", 1)[1]
    fenced = after.split("```", 2)[1]
    return fenced.split("\n", 1)[1]  # past the fence's language tag


def commands(text: str) -> list[str]:
    """Shell commands, a line each once continuation lines are joined."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def normalised(text: str) -> str:
    for pattern, replacement in _VARYING:
        text = pattern.sub(replacement, text)
    return text


def _free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _run(command: str, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=directory, capture_output=True, text=True, timeout=60
    )


def test_the_quick_start_runs_as_written_and_ends_in_the_calls_it_shows(tmp_path: Path) -> None:
    taken = [port for port in (50051, 8443) if not _free(port)]
    if taken:
        pytest.skip(f"QUICK START NOT RUN: port(s) {taken} in use on this machine")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "demo").symlink_to(ROOT / "demo")
    serve = commands(block("serve"))
    running: list[ChildProcess] = []
    try:
        for index, command in enumerate(serve):
            last = index == len(serve) - 1  # the sidecar, in the foreground of its terminal
            if _BACKGROUND.search(command) or last:
                child = ChildProcess(["bash", "-c", f"exec {_BACKGROUND.sub('', command)}"],
                                     cwd=tmp_path)  # fmt: skip
                running.append(child)
                child.wait_ready(DEMO_APP_LISTENING if "demo.app" in command else LISTENING)
                continue
            done = _run(command, tmp_path)
            assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
        calls = [_run(command, tmp_path) for command in commands(block("call"))]
    finally:
        for child in reversed(running):
            child.stop()
    assert [call.returncode for call in calls] == [0, 1], [call.stderr for call in calls]
    shown = "".join(call.stdout for call in calls)
    assert normalised(shown) == normalised(block("output")), shown
