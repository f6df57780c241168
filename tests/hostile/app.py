"""The probe upstream as a process of its own, so that a test can SIGKILL it and restart it.

    python -m tests.hostile.app [--port N]

Serves tests/probe.py's Probe on 127.0.0.1 (port N, or one the OS picks), prints
"listening on 127.0.0.1:PORT" once it accepts, and "call N METHOD" as its Nth call
arrives, so a test knows its calls are in flight here before it kills the app.
Gates (x-probe-gate) are never opened from outside: a gated call is held until it
ends some other way, which is what a test of a dying app needs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import grpc

from tests.probe import Probe, SeenCall


class AnnouncingProbe(Probe):
    """A Probe that says on stdout which calls reached it, numbered from 1."""

    def __init__(self) -> None:
        super().__init__()
        self._announcing = threading.Lock()  # one line at a time, numbered in order

    def _seen(self, method: str, context: grpc.ServicerContext) -> SeenCall:
        with self._announcing:  # counted and said together: no number skipped or said twice
            call = super()._seen(method, context)
            print(f"call {len(self.calls)} {method}", flush=True)
        return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    port = parser.parse_args(argv).port
    probe = AnnouncingProbe()
    probe.start(port)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    print(f"listening on 127.0.0.1:{probe.port}", flush=True)
    stopped.wait()
    probe.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
