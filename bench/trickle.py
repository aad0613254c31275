"""Latency at a trickle (issue 35): `make bench-trickle`, not part of `make bench` or `make test`.

For each transport, a real `b24queue ingress` process and a real `b24queue worker` process (the
no-op consumer of `bench.noop`, each handler sleeping 20 ms), and an open-loop poster (its own
process) sending ten portals' events (ten member_ids) at 5 events/s each, 50/s in all, for
`--seconds`. Reports, per transport, the stages an event goes through:

- `post`: due → the ingress's 200 (which it answers once the queue has the event: on Kafka, once
  the broker acknowledged the record);
- `fetched` (Kafka only): accepted → read by a bare aiokafka consumer beside the worker, in the
  same run (no group, every partition of the events topic, the worker's fetch wait): what Tansu
  itself costs, without b24queue's consumer;
- `handler_start`: accepted (the ingress's timestamp) → the handler starts, in the worker.

`--only sqlite|postgres|redis|kafka` (repeatable) narrows it; `--workers N` runs N worker
processes, `--cold` posts before the worker has joined its Kafka consumer group (its start-up
counts). Results also go to bench/results/trickle-<time>.json. The caller's B24QUEUE_KAFKA_*
and B24QUEUE_SQLITE_* reach the servers. The Kafka server is the tests' Tansu (memory storage).
No RabbitMQ: its message timestamp, the accepted time a worker sees, is whole seconds
(`bench.fairness` times from the post instead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.__main__ import ROOT, TOKEN, Server, deal_body, free_port
from bench.load import Pool, close, percentile
from bench.tables import QUEUE, QUEUES, server_env, topology

PORTALS = 10
PER_PORTAL_RATE = 5.0
HANDLER_S = 0.02
KEPT = ("B24QUEUE_KAFKA_", "B24QUEUE_SQLITE_")  # settings of the caller's the servers get


def member(i: int) -> str:
    return f"{i:02d}" + "5f2a9c3e1b7d4a6f8e0c2b4d6f8a0c"


async def post(url: str, bodies: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """Open loop: event i is due at start + i / (rate * portals), from portal i % portals; one
    keep-alive connection per portal (each answer takes a few ms: one at a time is enough, and a
    request due while its connection is busy waits, counted in its latency)."""
    per_portal = int(rate * seconds)
    pools = [Pool(url, body, per_portal) for body in bodies]
    clients = []
    for pool in pools:
        pool.open_loop = True
        pool.idle = await pool.connect(1)
        clients += pool.idle
    total = rate * len(pools)
    started = time.perf_counter()
    for i in range(per_portal * len(pools)):
        due = started + i / total
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pools[i % len(pools)].submit(due)
    await asyncio.gather(*(pool.finished for pool in pools))
    close(clients)
    latencies = sorted(x for pool in pools for x in pool.latencies)
    return {
        "events": len(latencies),
        "ok": sum(pool.statuses.get(200, 0) for pool in pools),
        "rate_per_s": round(len(latencies) / (time.perf_counter() - started), 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
    }


class FetchProbe:
    """A bare aiokafka consumer beside the worker, in a thread of its own: for each record of the
    events topic written after it started, the time from the record's accepted timestamp (its `t`
    header) to when its fetch returned it."""

    def __init__(self, bootstrap: str, topic: str, fetch_wait_ms: int) -> None:
        self._bootstrap, self._topic, self._wait = bootstrap, topic, fetch_wait_ms
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self._loop)

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        reader = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, fetch_max_wait_ms=self._wait)
        await reader.start()
        try:
            parts = reader.partitions_for_topic(self._topic) or set()
            tps = [TopicPartition(self._topic, p) for p in sorted(parts)]
            reader.assign(tps)
            await reader.seek_to_end(*tps)
            while not self._stop.is_set():
                batch = await reader.getmany(timeout_ms=200)
                now = datetime.now(UTC)
                for records in batch.values():
                    for record in records:
                        t = dict(record.headers or ()).get("t")
                        if t is not None:
                            accepted = datetime.fromisoformat(bytes(t).decode())
                            self.latencies.append((now - accepted).total_seconds())
        finally:
            await reader.stop()

    def close(self) -> dict[str, Any]:
        self._stop.set()
        self._task.result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        found = sorted(self.latencies)
        return {
            "events": len(found),
            "p50_ms": round(percentile(found, 0.50) * 1000, 1),
            "p99_ms": round(percentile(found, 0.99) * 1000, 1),
        }


def run(name: str, seconds: float, workers: int, cold: bool) -> dict[str, Any]:
    bodies = [deal_body(TOKEN, f"portal{i}.bitrix24.com", member(i)) for i in range(PORTALS)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with QUEUES[name](tmp, bodies[0], QUEUE, False) as (url, _, left):
            env = server_env(url, tmp) | {"BENCH_QUEUE": QUEUE}
            env |= {k: v for k, v in os.environ.items() if k.startswith(KEPT)}
            topology(env, "bench.noop:Noop")
            return one_round(env, tmp, bodies, left, seconds, workers, cold)


def one_round(
    env: dict[str, str],
    tmp: Path,
    bodies: list[bytes],
    left: Any,
    seconds: float,
    workers: int,
    cold: bool,
) -> dict[str, Any]:
    py = sys.executable
    port = free_port()
    server = Server(
        [py, "-m", "b24queue", "ingress", "--host", "127.0.0.1", "--port", str(port)], env, port
    )
    files = [tmp / f"latency-{i}.json" for i in range(workers)]
    spawned = time.monotonic()
    procs = [
        subprocess.Popen(
            [py, "-m", "b24queue", "worker", "bench.noop:Noop"],
            env=env | {"BENCH_LATENCY_FILE": str(path), "BENCH_HANDLER_S": str(HANDLER_S)},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for path in files
    ]
    probe = None
    result: dict[str, Any] = {}
    try:
        server.wait_ready("/readyz")
        url = env["B24QUEUE_BROKER_URL"]
        if url.startswith("kafka://"):
            from b24queue.transports.kafka.client import FETCH_WAIT_MS
            from bench.kafka_queue import EVENTS, wait_for_member

            if not cold:
                wait_for_member(url, env["BENCH_QUEUE"])
                result["worker_joined_after_s"] = round(time.monotonic() - spawned, 1)
            probe = FetchProbe(url.removeprefix("kafka://"), EVENTS, FETCH_WAIT_MS)
            time.sleep(1)
        argv = [py, "-m", "bench.trickle", "--post", server.url, "--seconds", str(seconds)]
        out = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=seconds + 60)
        result["post"] = json.loads(out.stdout)
        deadline = time.monotonic() + 30
        while left() and time.monotonic() < deadline:
            time.sleep(0.05)
        result["left"] = left()
    finally:
        if probe is not None:
            result["fetched"] = probe.close()
        for worker in procs:
            worker.terminate()
        for worker in procs:
            worker.wait(30)
        server.stop()
    starts = [json.loads(path.read_text()) for path in files if path.exists()]
    result["handler_start"] = starts[0] if len(starts) == 1 else starts
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=sorted(QUEUES), action="append")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="post from when the ingress is ready, not waiting for the worker to have joined "
        "its Kafka consumer group: the worker's start-up counts",
    )
    parser.add_argument("--post", help=argparse.SUPPRESS)  # the poster's own process
    args = parser.parse_args()
    if args.post:
        bodies = [deal_body(TOKEN, f"portal{i}.bitrix24.com", member(i)) for i in range(PORTALS)]
        result = asyncio.run(post(args.post, bodies, PER_PORTAL_RATE, args.seconds))
        print(json.dumps(result))
        return
    names = args.only or ["sqlite", "postgres", "redis", "kafka"]
    results = {name: run(name, args.seconds, args.workers, args.cold) for name in names}
    print(json.dumps(results, indent=2))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / time.strftime("trickle-%Y%m%d-%H%M%S.json")
    params = {k: v for k, v in vars(args).items() if k != "post"}
    out.write_text(json.dumps({"params": params, "results": results}, indent=2))


if __name__ == "__main__":
    main()
