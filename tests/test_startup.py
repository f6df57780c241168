"""Bad flags and files stop the sidecar at start-up: exit 2, one line naming the flag or file.

Each case starts from one good command line and changes one thing.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest

from sidecar import certs
from tests.conftest import Pki, SidecarFactory, assert_config_error
from tests.test_reload import _weak_server


def good_args(pki: Pki) -> dict[str, str]:
    return {
        "--upstream": "127.0.0.1:50051",
        "--listen": "127.0.0.1:0",
        "--cert": str(pki.cert("server")),
        "--key": str(pki.key("server")),
        "--ca": str(pki.dir / "ca.pem"),
        "--allow-cn": "alice",
    }


def command(args: dict[str, str | None]) -> list[str]:
    line: list[str] = []
    for flag, value in args.items():
        if value is not None:
            line += [flag, value] if value != "" else [flag]
    return line


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Path:
    """Broken and ill-fitting TLS files, one per case."""
    directory = tmp_path_factory.mktemp("bad")
    now = datetime.datetime.now(datetime.timezone.utc)
    (directory / "garbage.pem").write_text("this is not PEM\n")
    (directory / "broken.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    )
    certs.issue(
        pki.ca, "localhost", usage="server", not_before=now - datetime.timedelta(days=10), days=2
    ).write(directory, "expired")
    certs.issue(
        pki.ca, "localhost", usage="server", not_before=now + datetime.timedelta(days=1)
    ).write(directory, "notyet")
    (directory / "a-directory.pem").mkdir()
    os.mkfifo(directory / "a-fifo.pem")  # opening it to read would wait for a writer
    with (directory / "huge.pem").open("wb") as huge:  # sparse: 2 MiB that cost no disk
        huge.truncate(2 * 1024 * 1024)
    return directory


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--cert": "{bad}/missing.pem"}, ["--cert", "no such file", "missing.pem"]),
        ({"--key": "{bad}/missing.key"}, ["--key", "no such file"]),
        ({"--ca": "{bad}/missing-ca.pem"}, ["--ca", "no such file"]),
        ({"--cert": "{bad}/a-directory.pem"}, ["--cert", "is a directory"]),
        ({"--cert": "{bad}/a-fifo.pem"}, ["--cert", "a-fifo.pem is not a regular file"]),
        ({"--ca": "/dev/zero"}, ["--ca", "/dev/zero is not a regular file"]),
        ({"--key": "{bad}/huge.pem"}, ["--key", "huge.pem is larger than 1 MiB"]),
        ({"--cert": "{bad}/garbage.pem"}, ["--cert", "holds no PEM certificate"]),
        ({"--cert": "{bad}/broken.pem"}, ["--cert", "not a valid PEM certificate"]),
        ({"--key": "{bad}/garbage.pem"}, ["--key", "not a PEM private key"]),
        ({"--key": "{pki}/alice.key"}, ["--key does not match --cert"]),
        ({"--cert": "{bad}/expired.pem", "--key": "{bad}/expired.key"}, ["--cert", "expired on"]),
        (
            {"--cert": "{bad}/notyet.pem", "--key": "{bad}/notyet.key"},
            ["--cert", "not valid until"],
        ),
        ({"--ca": "{pki}/alice.pem"}, ["--ca", "holds no CA certificate"]),
        (
            {"--upstream": "192.0.2.10:50051"},
            ["--upstream", "not on loopback", "--unsafe-upstream"],
        ),
        ({"--upstream": "localhost"}, ["--upstream", "HOST:PORT"]),
        ({"--upstream": "localhost:http"}, ["--upstream", "not a number"]),
        ({"--listen": "127.0.0.1:70000"}, ["--listen", "out of range"]),
        ({"--allow-cn": None}, ["no allow rule", "--allow-all"]),
        ({"--allow-all": ""}, ["--allow-all cannot be combined"]),
        ({"--drain-grace": "-1"}, ["--drain-grace"]),
        ({"--reload-interval": "0.01"}, ["--reload-interval", "too short"]),
        ({"--log-format": "xml"}, ["--log-format", "xml"]),
        ({"--no-such-flag": ""}, ["--no-such-flag"]),
        ({"--cert": None}, ["--cert"]),
    ],
    ids=lambda value: (
        " ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else ""
    ),
)
def test_bad_configuration_exits_2_with_one_line(
    sidecars: SidecarFactory,
    pki: Pki,
    bad_files: Path,
    change: dict[str, str | None],
    expected: list[str],
) -> None:
    args: dict[str, str | None] = {**good_args(pki)}
    for flag, value in change.items():
        args[flag] = value.format(bad=bad_files, pki=pki.dir) if value else value
    assert_config_error(sidecars, command(args), *expected)


def test_unsafe_upstream_flag_allows_a_non_loopback_upstream(
    sidecars: SidecarFactory, pki: Pki
) -> None:
    # No call is made and grpc channels connect lazily, so nothing is ever sent
    # there; `.invalid` names never resolve anyway (RFC 6761).
    args = {**good_args(pki), "--upstream": "app.invalid:50051"}
    assert_config_error(sidecars, command(args), "--unsafe-upstream")
    process = sidecars.start(*command({**args, "--unsafe-upstream": ""}), default_tls=False)
    process.wait_ready()


def test_listen_port_in_use_exits_1_with_one_line(sidecars: SidecarFactory, pki: Pki) -> None:
    """A port held by a program that does not share it (no SO_REUSEPORT) cannot be taken."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = sidecars.run(*command({**good_args(pki), "--listen": f"127.0.0.1:{port}"}))
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_second_sidecar_on_the_same_port_starts_and_says_it_shares_it(
    sidecars: SidecarFactory, pki: Pki, data_plane: str
) -> None:
    """SO_REUSEPORT, for a rolling restart: the second binds, and warns that the port is
    shared, so that two sidecars started on one port by mistake are not silent."""
    first = sidecars.start("--upstream", "127.0.0.1:50051", "--allow-cn", "alice",
                           "--data-plane", data_plane)  # fmt: skip
    port = first.wait_ready()
    second = sidecars.start("--upstream", "127.0.0.1:50051", "--allow-cn", "alice",
                            "--data-plane", data_plane, listen=f"127.0.0.1:{port}")  # fmt: skip
    assert second.wait_ready() == port
    line = second.wait_for(r"WARNING .*another process listens on 127\.0\.0\.1:\d+ too.*")
    assert "a rolling restart" in line.group(0)
    assert not any("another process" in line for line in first.lines)


def test_help_documents_every_flag(sidecars: SidecarFactory) -> None:
    result = sidecars.run("--help")
    assert result.returncode == 0
    for flag in (
        "--upstream",
        "--listen",
        "--cert",
        "--key",
        "--ca",
        "--allow-cn",
        "--allow-dns",
        "--allow-uri",
        "--allow-all",
        "--unsafe-upstream",
        "--log-format",
        "--log-level",
        "--drain-grace",
        "--mode",
        "--server-name",
        "--unsafe-listen",
        "--config",
        "--check-config",
    ):
        assert flag in result.stdout
    assert "SIDECAR_SOME_KEY" in result.stdout  # every flag is also an environment variable


def test_a_key_openssl_refuses_exits_2_with_one_line(
    sidecars: SidecarFactory, pki: Pki, tmp_path: Path
) -> None:
    """An RSA-1024 server key passes the sidecar's own checks but not OpenSSL's security
    level: said at start-up, as a configuration error, not as a listener whose every
    handshake fails."""
    cert, key = tmp_path / "weak.pem", tmp_path / "weak.key"
    _weak_server(pki, cert, key)
    args = {**good_args(pki), "--cert": str(cert), "--key": str(key)}
    assert_config_error(sidecars, command(args), f"--cert: OpenSSL refuses {cert}: ")
