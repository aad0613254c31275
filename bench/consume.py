"""The worker benchmark: b24queue's worker against a raw aio-pika consume-and-ack loop, each in a
process of its own, on the same pre-filled quorum queue, with the same event loop and prefetch.

  python -m bench.consume                 interleaved rounds, then ranges (what is judged)
  python -m bench.consume plain|b24queue  one consumer; prints one JSON line (used by the above
                                          and by `make bench`)

The b24queue worker runs as `b24queue worker` does: INFO logging, one line per event, to its
stderr (a file here). Figures per consumer: msg/s from the first delivery to the last, and the
process's CPU time (user + system) over that span per message, the unit that does not depend on
how a shared machine's cores are split at the moment. `--compare-src DIR` also runs the worker
from another source tree (e.g. `git archive main | tar -x -C /tmp/base`) in the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

import b24queue
from b24queue import Event, EventConsumer
from b24queue.queues import QueueSpec
from b24queue.settings import load_settings
from b24queue.telemetry import logs
from b24queue.transports.amqp.topology import declare_consumer_queues, declare_exchanges
from bench.__main__ import amqp_call, fill, purge

try:
    from b24queue.process import loop_factory
    from b24queue.worker import Worker
except ImportError:  # a --compare-src tree from before b24queue.process and b24queue.worker
    from b24queue.commands import loop_factory  # type: ignore[attr-defined,no-redef]
    from b24queue.runtime import Worker  # type: ignore[import-not-found,no-redef]

ROOT = Path(__file__).resolve().parents[1]
EVENT_JSON = json.dumps(
    {
        "event": "ONCRMDEALUPDATE",
        "data": {"FIELDS": {"ID": "1"}},
        "ts": "1764367200",
        "auth": {"domain": "acme.bitrix24.com"},
    }
).encode()


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Span:
    """Wall and CPU time from the first delivery to the last."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.done = asyncio.Event()
        self._wall = self._cpu = 0.0

    def tick(self) -> None:
        if self.seen == 0:
            self._wall, self._cpu = time.perf_counter(), cpu_s()
        self.seen += 1
        if self.seen >= self.count:
            self._wall, self._cpu = time.perf_counter() - self._wall, cpu_s() - self._cpu
            self.done.set()

    def result(self) -> dict[str, Any]:
        # The first delivery starts the clock: count - 1 messages were handled in the span.
        n = self.count - 1
        return {
            "count": self.count,
            "seconds": round(self._wall, 3),
            "per_s": round(n / self._wall, 1),
            "cpu_us_per_msg": round(self._cpu / n * 1e6, 1),
        }


async def plain(amqp_url: str, queue_name: str, count: int, prefetch: int) -> dict[str, Any]:
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(queue_name)
    span = Span(count)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        json.loads(message.body)
        await message.ack()
        span.tick()

    await queue.consume(on_message)
    await span.done.wait()
    await connection.close()
    return span.result()


async def ours(args: argparse.Namespace) -> dict[str, Any]:
    span = Span(args.count)

    class NoOp(EventConsumer):
        queue = args.queue
        events = (args.binding,)
        prefetch = args.prefetch

        async def handle(self, event: Event) -> None:
            span.tick()

    settings = load_settings(amqp_url=args.amqp_url, exchange=args.exchange, unrouted=args.unrouted)
    logs.configure("INFO", "text")  # as the CLI does: the per-event line is part of the cost
    async with Worker(settings, [NoOp]):
        await span.done.wait()
    return {**span.result(), "from": str(Path(b24queue.__file__).parent.parent)}


def one(args: argparse.Namespace) -> None:
    # Both with the CLI's event loop (uvloop where installed), so that only the consumer differs;
    # BENCH_LOOP=asyncio: the standard loop, as a hand-written asyncio.run(...) would have it.
    factory = None if os.environ.get("BENCH_LOOP") == "asyncio" else loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        if args.kind == "plain":
            result = runner.run(plain(args.amqp_url, args.queue, args.count, args.prefetch))
        else:
            result = runner.run(ours(args))
    print(json.dumps(result))


def run_child(
    kind: str, args: argparse.Namespace, queue: str, exchange: str, src: str | None = None
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.consume", kind, "--queue", queue]
    argv += ["--count", str(args.count), "--prefetch", str(args.prefetch)]
    argv += ["--amqp-url", args.amqp_url, "--exchange", exchange]
    argv += ["--unrouted", f"{exchange}.unrouted", "--binding", "BENCHWORK"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("B24QUEUE_")}
    env["PYTHONPATH"] = os.pathsep.join([src or str(ROOT), str(ROOT)])
    if kind == "plain-asyncio":
        argv[3], env["BENCH_LOOP"] = "plain", "asyncio"
    # Run from `src` when given: `-m` puts the working directory first on sys.path, so that
    # tree's b24queue is the one imported (bench itself is not in it and comes from ROOT).
    with tempfile.TemporaryFile() as err:  # the worker's log lines: a file, as a journal would be
        out = subprocess.run(
            argv, cwd=src or ROOT, env=env, stdout=subprocess.PIPE, stderr=err, check=False
        )
        if out.returncode != 0:
            err.seek(0)
            raise RuntimeError(err.read().decode(errors="replace")[-2000:])
        err.seek(0)
        lines = sum(1 for _ in err)
    result: dict[str, Any] = json.loads(out.stdout)
    result["log_lines"] = lines
    return result


def interleaved(args: argparse.Namespace) -> None:
    prefix = f"benchc{uuid.uuid4().hex[:8]}"
    exchange, queue = f"{prefix}.events", f"{prefix}.work"
    settings = load_settings(
        amqp_url=args.amqp_url, exchange=exchange, unrouted=f"{exchange}.unrouted"
    )

    async def prepare(channel: Any) -> None:
        await declare_exchanges(channel, settings)
        spec = QueueSpec(queue, ("BENCHWORK",), (1.0, 5.0, 30.0, 120.0, 600.0), 20)
        await declare_consumer_queues(channel, settings, spec)

    kinds: dict[str, str | None] = {"plain": None, "b24queue": None}
    if args.plain_asyncio:
        kinds["plain-asyncio"] = None
    for src in args.compare_src:
        kinds[f"b24queue@{src}"] = src
    asyncio.run(amqp_call(prepare))
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    try:
        for n in range(args.rounds):
            for kind, src in kinds.items():
                asyncio.run(fill(queue, EVENT_JSON, args.count))
                r = run_child(kind.split("@")[0], args, queue, exchange, src)
                asyncio.run(purge(queue))
                results[kind].append(r)
                print(f"round {n + 1} {kind}: {json.dumps(r)}", flush=True)
    finally:
        asyncio.run(cleanup(prefix))
    print(summary(results))


def summary(results: dict[str, list[dict[str, Any]]]) -> str:
    def span(values: list[float], unit: str, digits: int = 0) -> str:
        low, high, mid = min(values), max(values), statistics.median(values)
        return f"{low:.{digits}f}-{high:.{digits}f} {unit} (median {mid:.{digits}f})"

    lines = [f"worker benchmark, {len(results['plain'])} interleaved rounds:"]
    width = max(len(k) for k in results)
    for kind, rs in results.items():
        cpu = [r["cpu_us_per_msg"] for r in rs]
        rate = [r["per_s"] for r in rs]
        lines.append(f"  {kind:<{width}}  {span(cpu, 'us CPU/msg')}, {span(rate, 'msg/s')}")
    # Each round's pair, one against the other: the noise of a shared machine mostly cancels.
    for kind in (k for k in results if k.startswith("b24queue")):
        pairs = list(zip(results[kind], results["plain"], strict=True))
        pace = [p["cpu_us_per_msg"] / o["cpu_us_per_msg"] for o, p in pairs]
        rate = [o["per_s"] / p["per_s"] for o, p in pairs]
        lines.append(
            f"  {kind} vs plain: messages per CPU second {span(pace, 'x', 2)}; "
            f"msg/s {span(rate, 'x', 2)}"
        )
    return "\n".join(lines)


async def cleanup(prefix: str) -> None:
    async def go(channel: Any) -> None:
        for suffix in ("work", "work.dlq", *(f"work.retry.{d}s" for d in (1, 5, 30, 120, 600))):
            await channel.queue_delete(f"{prefix}.{suffix}")
        for name in (f"{prefix}.events", f"{prefix}.events.unrouted"):
            await channel.exchange_delete(name)
        await channel.queue_delete(f"{prefix}.events.unrouted")

    await amqp_call(go)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", nargs="?", choices=("plain", "b24queue"))
    parser.add_argument("--queue")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", default="b24.events")
    parser.add_argument("--unrouted", default="b24.unrouted")
    parser.add_argument("--binding", default="#")
    parser.add_argument(
        "--compare-src", action="append", default=[], help="also the worker from this tree"
    )
    parser.add_argument(
        "--plain-asyncio", action="store_true", help="also the raw loop on the standard loop"
    )
    args = parser.parse_args()
    if args.kind is None:
        interleaved(args)
    else:
        one(args)


if __name__ == "__main__":
    main()
