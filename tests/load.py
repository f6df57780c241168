"""Steady load for the tests that change a running sidecar (rotation, reload, restart): a
number of workers each keep one call in flight, and each opens a new connection every few
calls, so that handshakes happen throughout. Every failure is kept with its code and
details: the tests assert there are none.

In-process: `with Load(target, credentials): ...`. In another network namespace, as a
process (`ip netns exec NS python -m tests.load ...`): it runs until its stdin closes or
says `stop`, then prints its result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc


@dataclass
class Result:
    ok: int = 0
    failures: list[str] = field(default_factory=list)  # "CODE: details", one per failed call
    connections: int = 0  # channels opened, each with its own connection


class Load:
    """Workers calling `method` on `target` until stopped; the result says how it went.
    credentials may be a function, asked for each new connection (a client rotating its
    own certificate)."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | Callable[[], grpc.ChannelCredentials] | None,
        *,
        workers: int = 16,
        calls_per_connection: int = 20,
        method: str = "/probe.Probe/Unary",
        payload: bytes = b"load",
        expect: bytes | None = b"load",
        timeout: float = 10.0,
    ) -> None:
        self._target, self._credentials = target, credentials
        self._calls_per_connection = calls_per_connection
        self._method, self._payload, self._expect = method, payload, expect
        self._timeout = timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self.result = Result()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def wait_for_calls(self, count: int, timeout: float = 30) -> None:
        """Wait until count more calls have succeeded than had when called."""
        with self._done:
            target = self.result.ok + count
            if not self._done.wait_for(lambda: self.result.ok >= target, timeout):
                raise AssertionError(f"load: {self.result.ok} calls, not {target}: {self.result}")

    def stop(self) -> Result:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.result

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _channel(self) -> grpc.Channel:
        # Its own subchannel: grpcio would otherwise share one connection among channels.
        options = [("grpc.use_local_subchannel_pool", 1)]
        credentials = self._credentials
        if callable(credentials):
            credentials = credentials()
        if credentials is None:
            return grpc.insecure_channel(self._target, options=options)
        return grpc.secure_channel(self._target, credentials, options=options)

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._channel() as channel:
                with self._lock:
                    self.result.connections += 1
                call = channel.unary_unary(self._method)
                for _ in range(self._calls_per_connection):
                    if self._stop.is_set():
                        return
                    self._one(call)

    def _one(self, call: grpc.UnaryUnaryMultiCallable) -> None:
        failure: str | None
        try:
            answer = call(self._payload, timeout=self._timeout)
        except grpc.RpcError as error:
            failure = f"{error.code().name}: {error.details()}"
        else:
            failure = None
            if self._expect is not None and answer != self._expect:
                failure = f"wrong answer: {answer[:40]!r}"
        with self._done:
            if failure is None:
                self.result.ok += 1
            else:
                self.result.failures.append(failure)
            self._done.notify_all()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load")
    parser.add_argument("--target", required=True)
    parser.add_argument("--tls-dir", help="ca.pem, client.pem, client.key (else plaintext)")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--method", default="/grpc.health.v1.Health/Check")
    args = parser.parse_args(argv)
    credentials = None
    if args.tls_dir:
        tls = Path(args.tls_dir)
        credentials = grpc.ssl_channel_credentials(
            (tls / "ca.pem").read_bytes(), (tls / "client.key").read_bytes(),
            (tls / "client.pem").read_bytes(),
        )  # fmt: skip
    # An empty request is a valid HealthCheckRequest; any answer will do.
    load = Load(args.target, credentials, workers=args.workers, method=args.method,
                payload=b"", expect=None)  # fmt: skip
    load.start()
    print("started", flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    result = load.stop()
    summary = {"ok": result.ok, "failed": len(result.failures), "connections": result.connections}
    print(json.dumps({**summary, "failures": result.failures[:20]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
