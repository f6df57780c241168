"""What a caller's text may cost the per-call caches: a `:path` can be ~16 KB of bytes that
are not UTF-8 (a U+FFFD each once decoded, six characters each once escaped), so the
caches keyed or filled by it keep only short ones, and metrics name long ones `other`.
(The review found 4,100 calls with distinct 15 KB paths pinning 300-600 MiB.)"""

from __future__ import annotations

import time

import grpc

from sidecar.h2 import calls
from sidecar.observe.accesslog import access_log
from sidecar.observe.calls import CallRecord
from sidecar.observe.logs import TextFormatter
from sidecar.observe.metrics import OTHER, CallsCounted
from tests.conftest import log_configured

LONG_PATH = b"/" + b"\xff" * 15_000 + b"/M"


def _record(method: str, peer: str = "CN=alice") -> CallRecord:
    now = time.monotonic()
    return CallRecord(method, now, "ipv4:127.0.0.1:1", peer, grpc.StatusCode.OK, ended=now)


def test_a_long_path_is_decoded_each_time_never_kept() -> None:
    calls._methods.clear()
    assert calls.method_of(LONG_PATH).startswith("/\ufffd")
    assert calls.method_of(b"/a.B/C") == "/a.B/C"
    assert list(calls._methods) == [b"/a.B/C"]


def test_a_long_path_is_not_kept_among_the_access_lines_heads() -> None:
    with log_configured(TextFormatter()) as stream:
        log = access_log()
        assert log is not None and log._lines is not None
        log.calls_ended([_record(LONG_PATH.decode("utf-8", "replace")), _record("/a.B/C")])
    assert [key[0] for key in log._lines._heads] == ["/a.B/C"]
    assert len(stream.getvalue().splitlines()) == 2  # and both calls were logged


def test_long_methods_and_callers_are_counted_as_other() -> None:
    counted = CallsCounted("ingress", method_limit=100, caller_limit=10)
    counted.calls_ended(
        [_record(LONG_PATH.decode("utf-8", "replace"), peer="CN=" + "x" * 300), _record("/a.B/C")]
    )
    assert counted.calls == {(OTHER, "OK"): 1, ("/a.B/C", "OK"): 1}
    assert counted.by_caller == {(OTHER, "OK"): 1, ("CN=alice", "OK"): 1}
    assert all(len(method) < 300 for method, _ in counted._labels)
