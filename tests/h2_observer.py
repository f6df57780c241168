"""A raw HTTP/2 upstream that never answers and records each stream's frames in order.

It shows what no gRPC library exposes: whether a request stream ended with
END_STREAM (a half-close), RST_STREAM (a cancel), or END_STREAM then RST_STREAM
(a cancel that leaked out as a half-close first).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import defaultdict

import h2.config
import h2.connection
import h2.events


class H2Observer:
    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._changed = threading.Condition()
        self.data_bytes: dict[int, int] = defaultdict(int)
        self.endings: dict[int, list[str]] = defaultdict(list)  # "end_stream" / "reset", in order
        self.stream_ids: list[int] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        connection.initiate_connection()
        sock.sendall(connection.data_to_send())
        with sock, contextlib.suppress(ConnectionResetError, BrokenPipeError):
            # (A sidecar may reset its connection to the app, when it stops, say: that ends
            # this connection, as a FIN does.)
            while data := sock.recv(65536):
                for event in connection.receive_data(data):
                    self._record(connection, event)
                sock.sendall(connection.data_to_send())

    def _record(self, connection: h2.connection.H2Connection, event: h2.events.Event) -> None:
        with self._changed:
            if isinstance(event, h2.events.RequestReceived):
                self.stream_ids.append(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.data_bytes[event.stream_id] += len(event.data)
            elif isinstance(event, h2.events.StreamEnded):
                self.endings[event.stream_id].append("end_stream")
            elif isinstance(event, h2.events.StreamReset):
                self.endings[event.stream_id].append("reset")
            self._changed.notify_all()

    def wait(self, predicate: object, timeout: float = 10) -> None:
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):  # type: ignore[arg-type]
                raise AssertionError("the upstream did not see what was expected")

    def close(self) -> None:
        self._closed = True
        self._listener.close()
