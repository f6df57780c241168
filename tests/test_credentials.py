"""A route's CredentialSource: new handshakes get what `reload()` swapped in, established
connections keep theirs, and a reload that finds a fault keeps the last good credentials.

The route runs in this process (as the sidecar runs it), on both data planes; the
handshakes are real TLS over loopback, read back as the certificate each one was served.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import uvloop
from cryptography import x509

from sidecar import certs
from sidecar.config.sources import load
from sidecar.errors import ConfigError
from sidecar.h2.frames import ACK, PING, PREFACE, SETTINGS, frame
from sidecar.pki.expiry import warning_time
from sidecar.runtime.route import Route
from tests.conftest import Pki
from tests.hostile.peers import client_context
from tests.probe import Probe


def _route(pki: Pki, probe: Probe, directory: Path, data_plane: str) -> Route:
    flags = {
        "listen": "127.0.0.1:0",
        "upstream": f"127.0.0.1:{probe.port}",
        "cert": str(directory / "server.pem"),
        "key": str(directory / "server.key"),
        "ca": str(pki.dir / "ca.pem"),
        "allow_cn": ["alice"],
        "data_plane": data_plane,
    }
    return Route(load(flags, {}).config.routes[0])


async def _connect(
    port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A TLS connection to the route (HTTP/2's preface sent), and the serial of the
    certificate it was served."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.write(PREFACE + frame(SETTINGS, 0, 0, b""))
    return reader, writer, x509.load_der_x509_certificate(der).serial_number


async def _served(port: int, context: ssl.SSLContext) -> int:
    """The serial of the certificate a new connection is served."""
    _, writer, serial = await _connect(port, context)
    writer.transport.abort()  # grpc core does not answer TLS's close_notify at once
    return serial


@pytest.mark.parametrize("data_plane", ["splice", "grpc"])
def test_a_reload_serves_new_handshakes_and_keeps_the_last_good_credentials(
    pki: Pki, probe: Probe, tmp_path: Path, data_plane: str
) -> None:
    first = pki.issue_server(tmp_path)
    route = _route(pki, probe, tmp_path, data_plane)
    context = client_context(pki, "alice")

    async def main() -> None:
        await route.start()
        assert route.port is not None
        still_open: asyncio.StreamWriter | None = None
        try:
            assert await _served(route.port, context) == first
            established, still_open, _ = await _connect(route.port, context)

            assert route.credentials.reload() is False  # the same content: nothing swapped
            second = pki.issue_server(tmp_path)
            assert route.credentials.reload() is True
            assert await _served(route.port, context) == second

            # A key that is not the certificate's: refused, naming the setting; the last good
            # credentials serve on.
            (tmp_path / "server.key").write_bytes(pki.key("alice").read_bytes())
            with pytest.raises(ConfigError, match="key"):
                route.credentials.reload()
            assert await _served(route.port, context) == second

            # The connection made before the swaps still works: a PING sent now is answered.
            still_open.write(frame(SETTINGS, ACK, 0, b"") + frame(PING, 0, 0, b"swapped!"))
            while True:
                head = await asyncio.wait_for(established.readexactly(9), 10)
                payload = await established.readexactly(int.from_bytes(head[:3], "big"))
                if head[3] == PING and head[4] & ACK:
                    assert payload == b"swapped!"
                    break
        finally:
            if still_open is not None:
                still_open.transport.abort()
            await route.stop(0)

    uvloop.run(main())


def test_a_refused_content_is_not_new_again_and_an_unreadable_file_is_new_once(
    pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    """What a periodic check relies on: changed() is true for content not seen before only,
    so that a fault is reported once, not at every check."""
    pki.issue_server(tmp_path)
    source = _route(pki, probe, tmp_path, "splice").credentials
    assert not source.changed()
    (tmp_path / "server.key").write_bytes(pki.key("alice").read_bytes())
    assert source.changed()
    with pytest.raises(ConfigError, match="does not match"):
        source.reload()
    assert not source.changed()  # refused already
    (tmp_path / "server.key").unlink()
    assert source.changed()
    with pytest.raises(ConfigError, match="no such file"):
        source.reload()
    assert not source.changed()
    second = pki.issue_server(tmp_path)
    assert source.changed()
    assert source.reload() is True
    assert source.current().material.leaf.serial_number == second
    assert not source.changed()


@pytest.mark.parametrize(
    ("days", "warned_after"),
    [(90, 60.0), (365, 365 * 2 / 3), (21, 14.0), (9, 2.0)],  # the last third, or 7 days left
)
def test_the_expiry_warning_comes_at_the_last_third_or_7_days_left_whichever_is_first(
    pki: Pki, days: int, warned_after: float
) -> None:
    leaf = certs.issue(pki.ca, "localhost", usage="server", days=days).certificate
    due = warning_time(leaf) - leaf.not_valid_before_utc
    assert abs(due.total_seconds() / 86400 - warned_after) < 1e-6, due
