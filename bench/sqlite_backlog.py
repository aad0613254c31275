"""SQLite with a backlog: does the ingress keep accepting while a worker drains a large queue?

`python -m bench.sqlite_backlog`: fills a queue file with `--waiting` events (300,000; direct
INSERTs in large transactions, not HTTP), starts a real `b24queue ingress` and a real worker (the
`b24queue worker` command in a process of its own, its claims timed) draining the queue with a
no-op consumer, then posts `--posts` events over HTTP at a steady
`--rate` (the keep-alive load generator of `bench.load`, open loop). Reports the events accepted
per second, the 503s (the ingress's own counter, its warm-up requests included), p50/p99 of the
posts, what the worker drained meanwhile, and the time of each claim (the claim statement inside
its write transaction: what keeps the database locked for everyone else).

Then the claim statement alone (`--no-micro` skips it, `--sizes` sets the backlogs): its plan,
and its median time with 0, 100k, 300k and 1M events waiting and one claim of 64 in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from b24queue.events.envelope import envelope_for
from b24queue.testing import make_event
from b24queue.transports.sqlite import queue as q
from b24queue.transports.sqlite.db import connect
from bench.__main__ import ROOT, TOKEN, Server, deal_body, free_port, load

QUEUE = "bench.backlog"
PREFETCH = 64  # bench.noop.Noop's


def rows(count: int) -> Iterator[tuple[Any, ...]]:
    """Rows as the ingress writes them for one deal update each, due now, in order."""
    e = envelope_for(make_event("ONCRMDEALUPDATE", {"FIELDS": {"ID": "1187"}}))
    headers, stamp, now = json.dumps(e.headers), e.timestamp.isoformat(), time.time()
    for _ in range(count):
        yield (QUEUE, uuid.uuid4().hex, e.routing_key, e.body, headers, stamp, e.event_type, now)


def fill(path: Path, count: int, batch: int = 50_000) -> float:
    """`count` more waiting events in `QUEUE`; returns the seconds it took."""
    started = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")  # only this connection: a fill, not a measure
    try:
        left = count
        while left > 0:
            n = min(batch, left)
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO messages (queue, message_id, routing_key, body, headers, timestamp, "
                "event_type, available_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows(n),
            )
            db.execute("COMMIT")
            left -= n
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return time.perf_counter() - started


def waiting(path: Path) -> int:
    db = sqlite3.connect(path, timeout=30)
    try:
        sql = "SELECT count(*) FROM messages WHERE queue = ?"
        return int(db.execute(sql, (QUEUE,)).fetchone()[0])
    finally:
        db.close()


def metric(port: int, name: str) -> float:
    """A counter of the ingress (summed over its labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name + "_total"))


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 2),
        "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def worker_process(claims_file: str) -> None:
    """`b24queue worker bench.noop:Noop`, with each claim timed (this process only)."""
    from b24queue.cli import main as cli

    timings: list[tuple[float, int]] = []
    claim = q.claim

    def timed(*args: Any, **kwargs: Any) -> list[Any]:
        started = time.perf_counter()
        claimed = claim(*args, **kwargs)
        timings.append((time.perf_counter() - started, len(claimed)))
        return claimed

    q.claim = timed  # the worker calls it through the module
    code = cli.run(["worker", "bench.noop:Noop"])
    Path(claims_file).write_text(json.dumps(timings))
    sys.exit(code)


def drain_run(waiting_events: int, posts: int, rate: float, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        path = tmp / "queue.sqlite3"
        body_file = tmp / "body.form"
        body_file.write_bytes(deal_body(TOKEN))
        env = {k: v for k, v in os.environ.items() if not k.startswith("B24QUEUE_")}
        env.update(
            {
                "B24QUEUE_BROKER_URL": f"sqlite:{path}",
                "B24QUEUE_APP_TOKENS": TOKEN,
                "B24QUEUE_LOG_LEVEL": "WARNING",
                "BENCH_QUEUE": QUEUE,
            }
        )
        py = sys.executable
        subprocess.run(
            [py, "-m", "b24queue", "topology", "bench.noop:Noop"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        result: dict[str, Any] = {"fill_s": round(fill(path, waiting_events), 1)}
        port = free_port()
        server = Server(
            [py, "-m", "b24queue", "ingress", "--host", "127.0.0.1", "--port", str(port)], env, port
        )
        claims_file = tmp / "claims.json"
        worker = subprocess.Popen(
            [py, "-m", "bench.sqlite_backlog", "--worker", str(claims_file)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            server.wait_ready("/readyz")
            deadline = time.monotonic() + 60
            while waiting_events and waiting(path) >= waiting_events:
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker did not start draining within 60 s")
                time.sleep(0.2)  # until the worker is draining
            before = waiting(path)
            started = time.perf_counter()
            posted = load(server.url, str(body_file), posts, concurrency, rate)
            elapsed = time.perf_counter() - started
            drained = before + posted["ok"] - waiting(path)
            result["posts"] = posted
            result["accepted_per_s"] = round(posted["ok"] / posted["seconds"], 1)
            result["ingress_503_total"] = metric(port, "b24queue_ingress_broker_unavailable")
            result["drained_meanwhile"] = drained
            result["drained_per_s"] = round(drained / elapsed, 1)
        finally:
            worker.terminate()
            worker.wait(60)
            server.stop()
        timings = json.loads(claims_file.read_text()) if claims_file.exists() else []
        result["claim_time"] = spread([s for s, _ in timings])
        result["rows_per_claim"] = round(statistics.fmean(n for _, n in timings), 1)
    return result


def claim_plan(db: sqlite3.Connection) -> list[str]:
    """The plan of each statement one claim runs (they are traced, then explained)."""
    traced: list[str] = []
    db.set_trace_callback(traced.append)
    db.execute("BEGIN IMMEDIATE")
    try:
        q.claim(db, QUEUE, "plan", PREFETCH, 60)
    finally:
        db.execute("ROLLBACK")
        db.set_trace_callback(None)
    return [
        detail
        for sql in traced
        if sql.lstrip().upper().startswith(("SELECT", "UPDATE"))
        for *_, detail in db.execute("EXPLAIN QUERY PLAN " + sql)
    ]


def micro(sizes: list[int], rounds: int = 15) -> dict[str, Any]:
    """The median time of one claim of 64, rolled back, with one claim of 64 in flight."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        path = Path(tmp_dir) / "queue.sqlite3"
        db = connect(path)
        q.declare(db, QUEUE, QUEUE + ".dlq", ("#",))
        have = 0
        for size in sorted(sizes):
            fill(path, size + PREFETCH - have)
            have = size + PREFETCH
            db.execute("BEGIN IMMEDIATE")
            q.claim(db, QUEUE, "in-flight", PREFETCH, 600)  # a worker's batch being handled
            db.execute("COMMIT")
            times = []
            for _ in range(rounds):
                db.execute("BEGIN IMMEDIATE")
                started = time.perf_counter()
                q.claim(db, QUEUE, "bench", PREFETCH, 60)
                times.append(time.perf_counter() - started)
                db.execute("ROLLBACK")
            db.execute("UPDATE messages SET lease_owner = NULL, lease_until = NULL")
            result[f"{size}_waiting_ms"] = round(statistics.median(times) * 1000, 2)
        result["plan"] = claim_plan(db)
        db.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--waiting", type=int, default=300_000)
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sizes", default="0,100000,300000,1000000")
    parser.add_argument("--no-micro", action="store_true")
    parser.add_argument("--no-drain", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the worker process of a run
    args = parser.parse_args()
    if args.worker:
        worker_process(args.worker)
    results: dict[str, Any] = {}
    if not args.no_drain:
        results["drain"] = drain_run(args.waiting, args.posts, args.rate, args.concurrency)
    if not args.no_micro:
        results["claim_alone"] = micro([int(s) for s in args.sizes.split(",")])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
