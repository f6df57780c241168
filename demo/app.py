"""The demo app: a plain, insecure gRPC server, as a legacy service would be.

It serves the seeds' services on 127.0.0.1 only and knows nothing of TLS:
- kv.KV: a key-value store persisted to a JSON file (written atomically: a
  temporary file, fsync, then rename; read with json, never eval);
- adder.Adder: adds two numbers;
- api.Metrics: synthetic samples for a metric between two times, one a minute;
- grpc.health.v1.Health: SERVING for the server ("") and each service, as the
  TLS-authentication seed's server adds.

    python -m demo.app --listen 127.0.0.1:50051 --data kv.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from demo.gen import (
    adder_pb2,
    adder_pb2_grpc,
    kv_pb2,
    kv_pb2_grpc,
    metrics_pb2,
    metrics_pb2_grpc,
)

_MAX_SAMPLES = 1440  # a day of minutes: enough for a demo, bounded for a server


class Store:
    """Keys and values in memory, saved to a JSON file after every change."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._data: dict[str, str] = {}
        if path is not None and path.exists():
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise SystemExit(f"{path}: expected a JSON object of strings")
            self._data = {str(key): str(value) for key, value in loaded.items()}

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def put(self, key: str, value: str) -> str | None:
        previous = self._data.get(key)
        self._data[key] = value
        self._save()
        return previous

    def delete(self, key: str) -> str | None:
        previous = self._data.pop(key, None)
        if previous is not None:
            self._save()
        return previous

    def _save(self) -> None:
        if self._path is None:
            return
        # A crash mid-write must leave the old file or the new one, never half of one.
        fd, temporary = tempfile.mkstemp(dir=self._path.parent, prefix=f".{self._path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(self._data, file, indent=1, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self._path)
        except BaseException:
            os.unlink(temporary)
            raise


class KeyValue(kv_pb2_grpc.KVServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def Get(self, request, context):
        value = self._store.get(request.key)
        if value is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no key {request.key!r}")
        return kv_pb2.GetReply(value=value)

    async def Put(self, request, context):
        previous = self._store.put(request.key, request.value)
        return kv_pb2.PutReply(previous=previous)

    async def Delete(self, request, context):
        previous = self._store.delete(request.key)
        return kv_pb2.DeleteReply(previous=previous)


class Adder(adder_pb2_grpc.AdderServicer):
    async def Add(self, request, context):
        return adder_pb2.AddReply(sum=request.a + request.b)


class Metrics(metrics_pb2_grpc.MetricsServicer):
    async def Query(self, request, context):
        start = request.start.ToDatetime(tzinfo=datetime.timezone.utc)
        end = request.end.ToDatetime(tzinfo=datetime.timezone.utc)
        if not request.metricName:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "metricName is required")
        if end < start:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "end is before start")
        minutes = min(int((end - start).total_seconds() // 60) + 1, _MAX_SAMPLES)
        metric = metrics_pb2.Metric(name=request.metricName, labels=request.labels)
        for minute in range(minutes):
            sample = metric.values.add()
            sample.time.FromDatetime(start + datetime.timedelta(minutes=minute))
            sample.value = round(50 + 25 * math.sin(minute / 10), 3)
        return metrics_pb2.QueryMetricsResponse(metrics=[metric])


async def serve(listen: str, data: Path | None) -> None:
    server = aio.server()
    kv_pb2_grpc.add_KVServicer_to_server(KeyValue(Store(data)), server)
    adder_pb2_grpc.add_AdderServicer_to_server(Adder(), server)
    metrics_pb2_grpc.add_MetricsServicer_to_server(Metrics(), server)
    health_servicer = health.aio.HealthServicer()
    for service in ("", "kv.KV", "adder.Adder", "api.Metrics"):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rpartition(":")[0]
    services = "kv.KV, adder.Adder, api.Metrics, grpc.health.v1.Health"
    print(f"demo app: plain gRPC (no TLS) on {host}:{port}: {services}", flush=True)
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.app", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:50051", help="(default: %(default)s)")
    parser.add_argument("--data", type=Path, help="JSON file the key-value store persists to")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the demo app quietly
        asyncio.run(serve(args.listen, args.data))


if __name__ == "__main__":
    main()
