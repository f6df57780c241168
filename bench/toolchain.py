"""Tools that are not Python packages, for the benchmark and the tests: apt-get and Go.

`ensure_debian_packages` installs Debian packages when what they provide is
missing (this project's machines are Debian, and we are root there).
`build_go_program` compiles one Go file against grpc-go from Debian's packages,
in GOPATH mode, with code generated from .proto files: nothing is fetched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

GO_PACKAGES = (
    "golang-go",
    "golang-google-grpc-dev",
    "golang-google-protobuf-dev",
    # grpc-go's codec goes through golang/protobuf: 1.5 wraps the APIv2 messages that
    # protoc-gen-go makes; 1.3, Debian's default alternative, panics on them.
    "golang-github-golang-protobuf-1-5-dev",
    "protoc-gen-go",
    "protoc-gen-go-grpc",
    "protobuf-compiler",
)
GO_NEEDS = (
    "go",
    "protoc",
    "protoc-gen-go",
    "protoc-gen-go-grpc",
    "/usr/share/gocode/src/google.golang.org/grpc/server.go",
    "/usr/share/gocode/src/github.com/golang/protobuf/proto/registry.go",  # 1.5, not 1.3
)


class ToolchainError(RuntimeError):
    """A tool is missing and cannot be installed, or a build failed; the message says which."""


def _present(need: str) -> bool:
    return Path(need).exists() if need.startswith("/") else shutil.which(need) is not None


def ensure_debian_packages(packages: Sequence[str], needs: Sequence[str]) -> None:
    """Install `packages` with apt-get unless everything in `needs` is there already.

    A need is an executable on PATH, or an absolute path that must exist.
    """
    missing = [need for need in needs if not _present(need)]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise ToolchainError(
            f"{', '.join(missing)} missing, and apt-get (as root) is not available"
        )
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
        if done.returncode != 0:
            raise ToolchainError(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
            )
    missing = [need for need in needs if not _present(need)]
    if missing:
        raise ToolchainError(f"installed {', '.join(packages)} but still missing {missing}")


def build_go_program(source: Path, protos: Sequence[Path], workdir: Path, module: str) -> Path:
    """Build `source` (package main) as `module`/main; its imports of `module`/gen/... are
    generated from `protos` (whose go_package options must say so). Returns the executable.
    """
    ensure_debian_packages(GO_PACKAGES, GO_NEEDS)
    program = workdir / "src" / module / "main"
    program.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, program / "main.go")
    include_dirs = sorted({str(proto.parent) for proto in protos})
    _run(
        ["protoc", *(f"-I{directory}" for directory in include_dirs), "-I/usr/include",
         f"--go_out={workdir / 'src'}", f"--go-grpc_out={workdir / 'src'}",
         *(str(proto) for proto in protos)],
        os.environ,
    )  # fmt: skip
    environment = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{workdir}:/usr/share/gocode",
        "GOFLAGS": "",
        "GOPROXY": "off",
    }
    if "GOCACHE" not in os.environ and "HOME" not in os.environ:
        environment["GOCACHE"] = str(workdir / "cache")
    executable = workdir / source.stem
    _run(["go", "build", "-o", str(executable), f"{module}/main"], environment)
    return executable


def _run(command: list[str], environment: os._Environ[str] | dict[str, str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    if done.returncode != 0:
        raise ToolchainError(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
