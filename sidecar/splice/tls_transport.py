"""A caller's TLS connection as an asyncio transport, OpenSSL reading and writing its socket.

The event loop's own TLS transport (uvloop's, like asyncio's) runs OpenSSL over
two memory buffers: every byte is copied from the socket into a 256 KiB read
buffer kept per connection, then into OpenSSL's input buffer, and each record
written goes through an output buffer and a second transport. Here OpenSSL holds
the socket itself (an `ssl.SSLSocket`, non-blocking) and the loop only says when
it is readable or writable: one copy fewer each way, no per-connection read
buffer, one transport instead of two. Measured with 1000 idle mTLS callers: 13 KiB
less per connection (40 KiB then 27, before other trims); new connections were
served at 1.04x haproxy's rate where the event loop's transport reached 0.95x, at
the same CPU per handshake, and 1 MiB calls took a tenth less CPU once OpenSSL
reads ahead (pki/tls.py `read_ahead`).

Closing is orderly, as TLS over TCP should be: what is buffered is written, then
a close_notify, and the caller's input is read away (undecrypted) until it closes
too, within `CLOSE_LINGER_SECONDS` and `CLOSE_DRAIN_BYTES`; closing a
socket with unread input would answer the caller with a reset, which can destroy
the last frames it has not read yet (a GOAWAY, a status).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from typing import Any

# Decrypted bytes handed to the protocol per readable event at most, so that one
# busy caller does not hold the event loop (the rest is read on the next turn).
_READ_PER_EVENT = 256 * 1024
# One TLS record's payload at most (16 KiB) with room to spare: one SSL_read's worth.
_RECORD = 16 * 1024 + 256
# An orderly close waits this long for the caller to close its side ...
CLOSE_LINGER_SECONDS = 5.0
# ... and reads away at most this much of its input meanwhile; past either, a reset.
CLOSE_DRAIN_BYTES = 1024 * 1024
_DEFAULT_HIGH = 64 * 1024

_WANTS = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class TLSTransport(asyncio.Transport):
    """The caller side of a connection whose TLS handshake is done (`tls`): the protocol
    gets its decrypted bytes, and what it writes is encrypted straight to the socket."""

    __slots__ = (
        "_buffer", "_buffered", "_closing", "_drained", "_eof", "_fd", "_high", "_linger",
        "_loop", "_lost", "_low", "_protocol", "_read_waits", "_reading", "_tls", "_writer_on",
        "_writing_paused",
    )  # fmt: skip

    def __init__(self, tls: ssl.SSLSocket, protocol: asyncio.Protocol) -> None:
        # (Not BaseTransport.__init__: its extra-info dict goes unused, get_extra_info answers.)
        self._loop = asyncio.get_running_loop()
        self._tls = tls
        self._fd = tls.fileno()
        self._protocol = protocol
        # Chunks not yet taken by OpenSSL (made when a write must wait: a deque costs 0.6
        # KiB); the first may be one SSL_write half done, retried as it is (OpenSSL
        # requires the same bytes again).
        self._buffer: collections.deque[bytes] | None = None
        self._buffered = 0
        self._high, self._low = _DEFAULT_HIGH, _DEFAULT_HIGH // 4
        self._writing_paused = False
        self._writer_on = False
        self._read_waits = False  # reading stopped until the socket is writable
        self._reading = True
        self._closing = False  # close() or abort() was called, or the connection failed
        self._eof = False  # the caller closed its side
        self._lost = False  # the socket is closed and connection_lost scheduled
        self._linger: asyncio.TimerHandle | None = None
        self._drained = 0  # input read away while closing
        try:
            protocol.connection_made(self)
        except BaseException:
            self.abort()
            raise
        if not self._closing and self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            # The handshake's last read may have taken the caller's first bytes too (read
            # ahead, see pki/tls.py): they are in OpenSSL, and the socket may stay silent.
            self._loop.call_soon(self._on_readable)

    # -- asyncio.BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # No "peercert": Python's decoded form raises on names that are not UTF-8; the
        # sidecar reads the DER form ("ssl_object".getpeercert(binary_form=True)).
        tls = self._tls
        try:
            if name == "ssl_object" or name == "socket":
                return tls
            if name == "peername":
                return tls.getpeername()
            if name == "sockname":
                return tls.getsockname()
            if name == "sslcontext":
                return tls.context
            if name == "cipher":
                return tls.cipher()
        except (OSError, ValueError):  # closed already
            return default
        return default

    def is_closing(self) -> bool:
        return self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def close(self) -> None:
        """Write what is buffered, then close in order (see the module)."""
        if self._closing:
            return
        self._closing = True
        if self._reading:
            self._loop.remove_reader(self._fd)
        if not self._buffer:
            self._shut_down()

    def abort(self) -> None:
        """Close now: what is buffered is dropped, and unread input answered by a reset."""
        self._closing = True
        self._finish(None)

    # -- reading

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        if self._closing or not self._reading:
            return
        self._reading = False
        self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._closing or self._reading:
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._on_readable)
        # OpenSSL may hold bytes read before the pause (decrypted or not: SSL_pending
        # counts only the former), which the socket will not announce again.
        self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        if self._closing or not self._reading:
            return
        tls, protocol = self._tls, self._protocol
        taken = 0
        try:
            while taken < _READ_PER_EVENT:
                try:
                    data = tls.recv(_RECORD)
                except ssl.SSLWantReadError:
                    return
                except ssl.SSLWantWriteError:
                    # A key update's answer waits on a full socket: read again once it
                    # can be written (the readable socket would call here in a loop).
                    self._read_when_writable()
                    return
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                if not data:
                    self._eof = True
                    if protocol.eof_received():
                        self.pause_reading()  # TLS has no half-close to keep reading on
                    else:
                        self.close()
                    if self._buffer and self._linger is None:
                        # A caller that closed and does not read would hold the rest.
                        self._linger = self._loop.call_later(
                            CLOSE_LINGER_SECONDS, self._finish, None
                        )
                    return
                taken += len(data)
                protocol.data_received(data)
                if self._closing or not self._reading:
                    return
        except OSError as error:  # ssl.SSLError included: the caller broke TLS
            self._fail(error)
            return
        self._loop.call_soon(self._on_readable)  # more may wait: after the others' turn

    def _read_when_writable(self) -> None:
        self._loop.remove_reader(self._fd)
        self._read_waits = True
        if not self._writer_on:
            self._writer_on = True
            self._loop.add_writer(self._fd, self._on_writable)

    # -- writing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = _DEFAULT_HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_pause()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                sent = self._tls.send(data)
            except _WANTS:
                sent = 0
            except OSError as error:
                self._fail(error)
                return
            if sent == len(data):
                return
            # An SSL_write refused as a whole is retried with the same bytes; one taken
            # in part (partial writes) continues with the rest.
            data = data[sent:]
        if self._buffer is None:
            self._buffer = collections.deque()
        self._buffer.append(bytes(data))
        self._buffered += len(data)
        if not self._writer_on:
            self._writer_on = True
            self._loop.add_writer(self._fd, self._on_writable)
        self._check_pause()

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return False  # TLS closes both ways at once

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def _check_pause(self) -> None:
        if not self._writing_paused and self._buffered > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        if self._lost:
            return
        tls, buffer = self._tls, self._buffer
        try:
            while buffer:  # (None when only a read waits for the socket to be writable)
                first = buffer[0]
                try:
                    sent = tls.send(first)
                except _WANTS:
                    return
                if sent < len(first):
                    buffer[0] = first[sent:]
                    self._buffered -= sent
                    return
                buffer.popleft()
                self._buffered -= sent
        except OSError as error:
            self._fail(error)
            return
        self._writer_on = False
        self._buffer = None
        self._loop.remove_writer(self._fd)
        if self._read_waits:
            self._read_waits = False
            if self._reading and not self._closing:
                self._loop.add_reader(self._fd, self._on_readable)
                self._loop.call_soon(self._on_readable)
        if self._writing_paused and self._buffered <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()
        if self._closing:
            self._shut_down()

    # -- the end

    def _shut_down(self) -> None:
        """All is written: send close_notify, then read the caller's input away until it
        closes too (or the linger is over). No FIN before: a gRPC client that has our
        close_notify and GOAWAY closes at once, but one that meets the connection's end
        (a FIN) before it has made sense of them may take the end for a failure: with a FIN
        here, grpcio clients of an app killed under load now and then waited a second or
        two before reconnecting, their calls meanwhile held (1 run in 12; 0 in 30 without)."""
        if self._lost:
            return
        if self._eof:
            self._finish(None)
            return
        if self._linger is not None:
            return
        tls = self._tls
        # close_notify (unwrap then wants the caller's, which is not awaited: want-read).
        with contextlib.suppress(OSError, ValueError):
            tls.unwrap()
        self._linger = self._loop.call_later(CLOSE_LINGER_SECONDS, self._finish, None)
        self._loop.add_reader(self._fd, self._read_away)

    def _read_away(self) -> None:
        try:
            chunk = socket.socket.recv(self._tls, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self._drained += len(chunk)
        if not chunk or self._drained > CLOSE_DRAIN_BYTES:
            self._finish(None)

    def _fail(self, error: Exception) -> None:
        self._closing = True
        self._finish(error)

    def _finish(self, error: Exception | None) -> None:
        """Close the socket and tell the protocol, once."""
        if self._lost:
            return
        self._lost = True
        if self._linger is not None:
            self._linger.cancel()
        loop, fd = self._loop, self._fd
        loop.remove_reader(fd)
        if self._writer_on:
            self._writer_on = False
            loop.remove_writer(fd)
        self._tls.close()
        self._buffer = None
        self._buffered = 0
        loop.call_soon(self._protocol.connection_lost, error)
