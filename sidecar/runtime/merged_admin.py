"""The admin answers of a supervisor (runtime/workers.py): its workers', added up.

Each worker serves its own admin listener on a private unix socket; at each request
the supervisor asks every worker that is ready and merges what they say:
- /metrics: each series added up across workers, but for those that are one value per
  process, the same in each (_TAKEN_ONCE: the earliest is given). Counters never go
  back: a worker that does not answer in time is counted as it last answered, and the
  last counts of a worker that died are kept, added to its successor's. Plus
  `sidecar_workers` (workers that answered) and `sidecar_worker_restarts_total`.
- /readyz: ready when every worker is; each problem is named once, however many
  workers have it, and a worker that is not serving is named.
- /status: the routes (as the first worker that answers says) and each worker.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.runtime.admin import exposition

if TYPE_CHECKING:
    from sidecar.runtime.workers import Supervisor, Worker

_ASK_SECONDS = 2.0  # a worker's answer; one that takes longer is counted as not ready
# One value per process, the same in every worker: given once (the earliest), not added up.
_TAKEN_ONCE = {"sidecar_start_time_seconds", "sidecar_certificate_expiry_timestamp_seconds"}
# Families whose samples only grow (a gauge's may fall: a dead worker's are dropped).
_GROWING = {"counter", "histogram", "summary"}

_Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class WorkersAnswers:
    """The supervisor's admin answers (runtime/admin.Answers)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        # Each worker's families as it last answered, with the pid that answered.
        self._last: dict[int, tuple[int, list[Metric]]] = {}
        self._retired: list[Metric] = []  # the growing families of workers that died

    def retire(self, index: int, pid: int) -> None:
        """The process `pid` in worker `index` has ended: its last counts are kept."""
        last = self._last.get(index)
        if last is not None and last[0] == pid:
            del self._last[index]
            growing = [family for family in last[1] if family.type in _GROWING]
            self._retired = _merged([self._retired, growing])

    async def _ask_all(self, target: str) -> list[tuple[Worker, bytes | None]]:
        """Each worker's answer to GET target on its admin socket (None: it gave none)."""
        workers = self._supervisor.workers
        answers = await asyncio.gather(
            *(
                _ask(os.path.join(self._supervisor.directory, f"worker-{w.index}.sock"), target)
                if w.ready
                else _nothing()
                for w in workers
            )
        )
        return list(zip(workers, answers, strict=True))

    async def not_ready(self) -> list[str]:
        problems: dict[str, None] = {}
        for worker, answer in await self._ask_all("/readyz"):
            if answer is None:
                problems[f"worker {worker.index} is not serving (starting, or not answering)"] = (
                    None
                )
                continue
            for problem in json.loads(answer).get("not_ready", []):
                problems[problem] = None  # the same problem in every worker, said once
        return list(problems)

    async def metrics(self, openmetrics: bool) -> tuple[str, bytes]:
        answered = 0
        for worker, answer in await self._ask_all("/metrics"):
            if answer is not None and worker.pid is not None:
                answered += 1
                self._last[worker.index] = (
                    worker.pid,
                    list(text_string_to_metric_families(answer.decode())),
                )
        merged = _merged([families for _, families in self._last.values()] + [self._retired])
        workers = self._supervisor.workers
        merged.append(_gauge("sidecar_workers", "Workers whose metrics were read now", answered))
        restarts = Metric("sidecar_worker_restarts", "Workers started again after dying", "counter")
        restarts.add_sample("sidecar_worker_restarts_total", {}, sum(w.restarts for w in workers))
        merged.append(restarts)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(merged))
        return exposition(registry, openmetrics)

    async def status(self) -> dict[str, object]:
        answers = await self._ask_all("/status")
        statuses = [None if answer is None else json.loads(answer) for _, answer in answers]
        first: dict[str, Any] = next((status for status in statuses if status), {})
        return {
            "routes": first.get("routes", []),
            "workers": [
                {
                    "worker": worker.index,
                    "pid": worker.pid,
                    "ready": worker.ready,
                    "restarts": worker.restarts,
                    "last_reload": None if status is None else status.get("last_reload"),
                }
                for (worker, _), status in zip(answers, statuses, strict=True)
            ],
        }


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _merged(sources: Sequence[Sequence[Metric]]) -> list[Metric]:
    """Families of several processes as one process's (see the module doc)."""
    families: dict[str, Metric] = {}
    values: dict[str, _Series] = {}
    for source in sources:
        for family in source:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            series = values[family.name]
            once = family.name in _TAKEN_ONCE
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in series:
                    series[key] = sample.value
                elif once:
                    series[key] = min(series[key], sample.value)
                else:
                    series[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def _gauge(name: str, documentation: str, value: float) -> Metric:
    gauge = Metric(name, documentation, "gauge")
    gauge.add_sample(name, {}, value)
    return gauge


async def _nothing() -> None:
    return None


async def _ask(path: str, target: str) -> bytes | None:
    """The body of a worker admin listener's answer to GET target; None if it gave none."""
    try:
        answer = await asyncio.wait_for(_get(path, target), _ASK_SECONDS)
    except (OSError, asyncio.TimeoutError):
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")):
        return None
    return body


async def _get(path: str, target: str) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
        return await reader.read()  # the admin listener closes after one answer
    finally:
        writer.close()
