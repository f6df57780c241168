"""The template seed's interactive client: `get K`, `put K V`, `delete K`, `exit`.

It talks plaintext gRPC, as a legacy client does, to a local egress sidecar that
carries its calls over mTLS to the app's ingress sidecar. Also: `add A B`
(adder.Adder) and `metrics NAME [LABEL=VALUE]...` (api.Metrics, the last 5 minutes).

    python -m demo.client --target 127.0.0.1:50052
    echo 'put colour blue' | python -m demo.client
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from collections.abc import Callable, Sequence

import grpc

from demo.gen import (
    adder_pb2,
    adder_pb2_grpc,
    kv_pb2,
    kv_pb2_grpc,
    metrics_pb2,
    metrics_pb2_grpc,
)

USAGE = """\
commands:
  get KEY               the value of KEY
  put KEY VALUE         set KEY, print the previous value
  delete KEY            remove KEY, print the previous value
  add A B               adder.Adder: A + B (integers)
  metrics NAME [L=V]... api.Metrics: NAME's samples over the last 5 minutes
  help                  this text
  exit                  leave"""


class Session:
    """One channel and the stubs on it; each command returns the line to print."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        self.kv = kv_pb2_grpc.KVStub(channel)
        self.adder = adder_pb2_grpc.AdderStub(channel)
        self.metrics = metrics_pb2_grpc.MetricsStub(channel)
        self.timeout = timeout
        self.commands: dict[str, tuple[int | None, Callable[[list[str]], str]]] = {
            "get": (1, self.get),
            "put": (2, self.put),
            "delete": (1, self.delete),
            "add": (2, self.add),
            "metrics": (None, self.query),
        }

    def run(self, line: str) -> str:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            return f"usage error: {exc}"
        if not words:
            return ""
        name, arguments = words[0].lower(), words[1:]
        if name == "help":
            return USAGE
        command = self.commands.get(name)
        if command is None:
            return f"unknown command {name!r}\n{USAGE}"
        arity, handler = command
        if (arity is not None and len(arguments) != arity) or (arity is None and not arguments):
            return f"usage error: wrong number of arguments for {name}\n{USAGE}"
        try:
            return handler(arguments)
        except grpc.RpcError as error:
            return f"error: {error.code().name}: {error.details()}"

    def get(self, arguments: list[str]) -> str:
        reply = self.kv.Get(kv_pb2.GetRequest(key=arguments[0]), timeout=self.timeout)
        return reply.value

    def put(self, arguments: list[str]) -> str:
        request = kv_pb2.PutRequest(key=arguments[0], value=arguments[1])
        reply = self.kv.Put(request, timeout=self.timeout)
        return f"ok (previous: {_previous(reply)})"

    def delete(self, arguments: list[str]) -> str:
        reply = self.kv.Delete(kv_pb2.DeleteRequest(key=arguments[0]), timeout=self.timeout)
        return f"ok (previous: {_previous(reply)})"

    def add(self, arguments: list[str]) -> str:
        try:
            a, b = (int(argument) for argument in arguments)
        except ValueError:
            return "usage error: add takes two integers"
        reply = self.adder.Add(adder_pb2.AddRequest(a=a, b=b), timeout=self.timeout)
        return str(reply.sum)

    def query(self, arguments: list[str]) -> str:
        labels = dict(argument.partition("=")[::2] for argument in arguments[1:])
        request = metrics_pb2.QueryMetricsRequest(metricName=arguments[0], labels=labels)
        end = datetime.datetime.now(datetime.timezone.utc).replace(second=0, microsecond=0)
        request.start.FromDatetime(end - datetime.timedelta(minutes=4))
        request.end.FromDatetime(end)
        reply = self.metrics.Query(request, timeout=self.timeout)
        lines = []
        for metric in reply.metrics:
            shown = ",".join(f"{key}={value}" for key, value in sorted(metric.labels.items()))
            lines.append(f"{metric.name}{{{shown}}}")
            for sample in metric.values:
                lines.append(f"  {sample.time.ToJsonString()}  {sample.value:g}")
        return "\n".join(lines)


def _previous(reply: kv_pb2.PutReply | kv_pb2.DeleteReply) -> str:
    return repr(reply.previous) if reply.HasField("previous") else "none"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.client", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--target", default="127.0.0.1:50052", help="(default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    args = parser.parse_args(argv)
    interactive = sys.stdin.isatty()
    with grpc.insecure_channel(args.target) as channel:
        session = Session(channel, args.timeout)
        if interactive:
            print(f"connected to {args.target} (plaintext); 'help' lists commands")
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            if line.strip().lower() in ("exit", "quit"):
                break
            if not interactive and line.strip():
                print(f"> {line.strip()}")
            output = session.run(line)
            if output:
                print(output, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
