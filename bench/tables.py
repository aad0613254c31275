"""The queues end to end (SQLite, PostgreSQL, Redis, Kafka), each beside a hand-written baseline
measured in the same run.

`python -m bench.tables` (also part of `make bench`): for each transport, a real `b24queue
ingress` process, a real `b24queue worker` draining with a no-op consumer, the keep-alive load
generator of `bench.load` at saturation; then the same at half that rate for latency. Reports
events/s accepted (durably), how long the worker took to drain, CPU per event of the ingress and
the worker, accepted-to-handled p50/p99, and the baseline: one INSERT + COMMIT per event from one
connection (what a hand-written "database queue" does; for Kafka, one acknowledged send per
event). `--only sqlite|postgres|redis|kafka` runs one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.__main__ import ROOT, TOKEN, Server, deal_body, free_port, load

POSTGRES_URL = os.environ.get("B24QT_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sqlite_baseline(path: Path, count: int, body: bytes) -> float:
    """Events/s of one INSERT and one COMMIT each, WAL and synchronous=FULL: no group commit."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, body BLOB)")
    started = time.perf_counter()
    for _ in range(count):
        db.execute("BEGIN")
        db.execute("INSERT INTO q (body) VALUES (?)", (body,))
        db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    return round(count / elapsed, 1)


def postgres_baseline(schema: str, count: int, body: bytes) -> float:
    """Events/s of one INSERT and its COMMIT each (autocommit), synchronous_commit on."""
    import asyncpg

    async def run() -> float:
        db = await asyncpg.connect(POSTGRES_URL, server_settings={"synchronous_commit": "on"})
        try:
            await db.execute(
                f'CREATE TABLE "{schema}".plain (id bigserial PRIMARY KEY, body bytea)'
            )
            insert = await db.prepare(f'INSERT INTO "{schema}".plain (body) VALUES ($1)')
            started = time.perf_counter()
            for _ in range(count):
                await insert.fetch(body)
            return count / (time.perf_counter() - started)
        finally:
            await db.close()

    return round(asyncio.run(run()), 1)


def postgres_sql(statement: str) -> Any:
    import asyncpg

    async def run() -> Any:
        db = await asyncpg.connect(POSTGRES_URL)
        try:
            return await db.fetchval(statement)
        finally:
            await db.close()

    return asyncio.run(run())


@contextmanager
def sqlite_queue(
    tmp: Path, body: bytes, queue: str = "", baseline: bool = True
) -> Iterator[tuple[str, float, Callable[[], int]]]:
    db = tmp / "queue.sqlite3"

    def left() -> int:
        conn = sqlite3.connect(db, timeout=10)
        try:
            return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        finally:
            conn.close()

    yield f"sqlite:{db}", (sqlite_baseline(tmp / "plain.db", 2000, body) if baseline else 0.0), left


@contextmanager
def postgres_queue(
    tmp: Path, body: bytes, queue: str = "", baseline: bool = True
) -> Iterator[tuple[str, float, Callable[[], int]]]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    postgres_sql(f'CREATE SCHEMA "{schema}"')
    try:

        def left() -> int:
            return int(postgres_sql(f'SELECT count(*) FROM "{schema}".messages'))

        os.environ["B24QUEUE_POSTGRES_SCHEMA"] = schema
        yield POSTGRES_URL, (postgres_baseline(schema, 2000, body) if baseline else 0.0), left
    finally:
        os.environ.pop("B24QUEUE_POSTGRES_SCHEMA", None)
        postgres_sql(f'DROP SCHEMA "{schema}" CASCADE')


def redis_baseline(url: str, count: int, body: bytes) -> float:
    """Events/s of one XADD each (AOF, appendfsync always), one connection: no batching."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        started = time.perf_counter()
        for _ in range(count):
            client.xadd("plain", {"b": body})
        return round(count / (time.perf_counter() - started), 1)
    finally:
        client.close()


@contextmanager
def redis_queue(
    tmp: Path, body: bytes, queue: str = "", baseline: bool = True
) -> Iterator[tuple[str, float, Callable[[], int]]]:
    """A Redis of the benchmark's own, persistent as b24queue needs it. Each context manager of
    QUEUES yields the broker URL, the baseline (events/s; 0.0 when `baseline` is false) and how
    many events of `queue` (default bench.tables) are still to be handled."""
    import redis

    from tests.support.redis_server import redis_server

    with redis_server() as server:
        client = redis.Redis.from_url(server.url)

        def left() -> int:  # entries still in the stream: not yet acked (XACK + XDEL)
            return int(client.xlen("b24queue:q:" + (queue or QUEUE)))

        try:
            yield server.url, (redis_baseline(server.url, 2000, body) if baseline else 0.0), left
        finally:
            client.close()


QUEUE = "bench.tables"


@contextmanager
def kafka_queue(
    tmp: Path, body: bytes, queue: str = "", baseline: bool = True
) -> Iterator[tuple[str, float, Callable[[], int]]]:
    from bench.kafka_queue import kafka_queue as tansu_queue

    with tansu_queue(tmp, body, queue or QUEUE, baseline) as found:
        yield found


QUEUES = {
    "sqlite": sqlite_queue,
    "postgres": postgres_queue,
    "redis": redis_queue,
    "kafka": kafka_queue,
}


def server_env(url: str, tmp: Path) -> dict[str, str]:
    """The environment of the ingress and the worker on the queue at `url` (tmp: the spool's
    directory), with nothing of the caller's B24QUEUE_* but the schema a queue above set and
    the partitions of the Kafka topics (B24QUEUE_KAFKA_PARTITIONS, 12 by default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("B24QUEUE_")}
    env.update(
        {
            "B24QUEUE_BROKER_URL": url,
            "B24QUEUE_APP_TOKENS": TOKEN,
            "B24QUEUE_LOG_LEVEL": "WARNING",
            "B24QUEUE_PUBLISH_TIMEOUT_S": "5",
            "B24QUEUE_SPOOL_PATH": str(tmp / "spool.sqlite3"),
        }
    )
    for kept in ("B24QUEUE_POSTGRES_SCHEMA", "B24QUEUE_KAFKA_PARTITIONS"):
        if kept in os.environ:
            env[kept] = os.environ[kept]
    return env


def topology(env: dict[str, str], *consumers: str) -> None:
    """`b24queue topology` of the consumers (module:Class), in `env`."""
    subprocess.run(
        [sys.executable, "-m", "b24queue", "topology", *consumers],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def run(name: str, requests: int, concurrency: int) -> dict[str, Any]:
    body = deal_body(TOKEN)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        body_file = tmp / "body.form"
        body_file.write_bytes(body)
        with QUEUES[name](tmp, body) as (url, baseline, left):
            results: dict[str, Any] = {f"plain_{name}_commit_per_event_per_s": baseline}
            env = server_env(url, tmp)
            topology(env, "bench.noop:Noop")
            for label in ("saturated", "half_rate"):
                wanted = None if label == "saturated" else results["saturated"]["rps"] / 2
                results[label] = one_round(
                    env, tmp, label, body_file, left, wanted, requests, concurrency
                )
    return results


def one_round(
    env: dict[str, str],
    tmp: Path,
    label: str,
    body_file: Path,
    left: Callable[[], int],
    rate: float | None,
    requests: int,
    concurrency: int,
) -> dict[str, Any]:
    py = sys.executable
    port = free_port()
    server = Server(
        [py, "-m", "b24queue", "ingress", "--host", "127.0.0.1", "--port", str(port)], env, port
    )
    latency_file = tmp / f"latency-{label}.json"
    worker = subprocess.Popen(
        [py, "-m", "b24queue", "worker", "bench.noop:Noop"],
        env={**env, "BENCH_LATENCY_FILE": str(latency_file)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        server.wait_ready("/readyz")
        if env["B24QUEUE_BROKER_URL"].startswith("kafka://"):
            from bench.kafka_queue import wait_for_member

            wait_for_member(env["B24QUEUE_BROKER_URL"], QUEUE)
        ingress0, worker0 = cpu_s(server.proc.pid), cpu_s(worker.pid)
        started = time.perf_counter()
        result = load(server.url, str(body_file), requests, concurrency, rate)
        deadline = time.monotonic() + 120
        while left() and time.monotonic() < deadline:
            time.sleep(0.05)
        result["drained_after_s"] = round(time.perf_counter() - started, 2)
        result["drained_per_s"] = round(result["ok"] / result["drained_after_s"], 1)
        result["left"] = left()
        handled = result["ok"] + 200  # the load generator's warm-up requests too
        result["ingress_cpu_us_per_event"] = round(
            (cpu_s(server.proc.pid) - ingress0) / handled * 1e6, 1
        )
        result["spooled"] = spooled(port)
        result["worker_cpu_us_per_event"] = round((cpu_s(worker.pid) - worker0) / handled * 1e6, 1)
    finally:
        worker.terminate()
        worker.wait(30)
        server.stop()
    if latency_file.exists():
        result["accepted_to_handled"] = json.loads(latency_file.read_text())
    return result


def spooled(port: int) -> float:
    """Events the ingress put in its spool (from its metrics): a run that measured the spool
    instead of the queue is void."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("b24queue_ingress_spooled_total"):
                return float(line.split()[-1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--only", choices=sorted(QUEUES))
    args = parser.parse_args()
    names = [args.only] if args.only else sorted(QUEUES, reverse=True)
    print(
        json.dumps({name: run(name, args.requests, args.concurrency) for name in names}, indent=2)
    )


if __name__ == "__main__":
    main()
