"""The SQLite transport end to end, beside a plain SQLite baseline measured in the same run.

`python -m bench.sqlite` (also part of `make bench`): a real `b24queue ingress` process on a
SQLite queue file, a real `b24queue worker` draining it with a no-op consumer, the keep-alive load
generator of `bench.load` at saturation; then the same at half that rate for latency. Reports
events/s accepted (fsync on), how long the worker took to drain, CPU per event of both
processes, and the baseline: one INSERT + COMMIT per event from one connection (what a
hand-written "database queue" does).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import ROOT, TOKEN, Server, deal_body, free_port, load

QUEUE = "bench.sqlite"


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def baseline(path: Path, count: int, body: bytes) -> float:
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


def left(path: Path) -> int:
    db = sqlite3.connect(path, timeout=10)
    try:
        return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        db.close()


def run(requests: int, concurrency: int) -> dict[str, Any]:
    body = deal_body(TOKEN)
    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body.form"
        body_file.write_bytes(body)
        results: dict[str, Any] = {
            "plain_sqlite_commit_per_event_per_s": baseline(Path(tmp) / "plain.db", 2000, body)
        }
        db = Path(tmp) / "queue.sqlite3"
        env = {k: v for k, v in os.environ.items() if not k.startswith("B24QUEUE_")}
        env.update(
            {
                "B24QUEUE_BROKER_URL": f"sqlite:{db}",
                "B24QUEUE_APP_TOKENS": TOKEN,
                "B24QUEUE_LOG_LEVEL": "WARNING",
                "B24QUEUE_PUBLISH_TIMEOUT_S": "5",
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
        for label, rate in (("saturated", None), ("half_rate", "half")):
            port = free_port()
            server = Server(
                [py, "-m", "b24queue", "ingress", "--host", "127.0.0.1", "--port", str(port)],
                env,
                port,
            )
            latency_file = Path(tmp) / f"latency-{label}.json"
            worker = subprocess.Popen(
                [py, "-m", "b24queue", "worker", "bench.noop:Noop"],
                env={**env, "BENCH_LATENCY_FILE": str(latency_file)},
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                server.wait_ready("/readyz")
                cpu0 = cpu_s(server.proc.pid) + cpu_s(worker.pid)
                wanted = None if rate is None else results["saturated"]["rps"] / 2
                started = time.perf_counter()
                result = load(server.url, str(body_file), requests, concurrency, wanted)
                deadline = time.monotonic() + 120
                while left(db) and time.monotonic() < deadline:
                    time.sleep(0.05)
                result["drained_after_s"] = round(time.perf_counter() - started, 2)
                result["left"] = left(db)
                handled = result["ok"] + 200  # the load generator's warm-up requests too
                cpu = cpu_s(server.proc.pid) + cpu_s(worker.pid) - cpu0
                result["cpu_us_per_event"] = round(cpu / handled * 1e6, 1)
                results[label] = result
            finally:
                worker.terminate()
                worker.wait(30)
                server.stop()
            if latency_file.exists():
                results[label]["accepted_to_handled"] = json.loads(latency_file.read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    results = run(args.requests, args.concurrency)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
