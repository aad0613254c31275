"""`make soak`: the ingress and a worker under a steady load for a while (default 5 minutes),
sampling their resident memory, to show it does not grow. Load from a separate process."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.__main__ import (
    AMQP_URL,
    ROOT,
    TOKEN,
    Server,
    amqp_call,
    cleanup,
    deal_body,
    free_port,
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drained(queue: str, timeout_s: float) -> int:
    """Wait until the worker has emptied its queue; what is left then."""

    async def depth(channel: Any) -> int:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)

    deadline = time.monotonic() + timeout_s
    left = await amqp_call(depth)
    while left and time.monotonic() < deadline:
        await asyncio.sleep(1)
        left = await amqp_call(depth)
    return left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--rate", type=float, default=800.0)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    prefix = f"soak{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("B24QUEUE_")}
    env.update(
        {
            "B24QUEUE_AMQP_URL": AMQP_URL,
            "B24QUEUE_EXCHANGE": f"{prefix}.events",
            "B24QUEUE_UNROUTED": f"{prefix}.unrouted",
            "B24QUEUE_APP_TOKENS": TOKEN,
            "B24QUEUE_LOG_LEVEL": "WARNING",
            "B24QUEUE_SPOOL_PATH": f"{tempfile.gettempdir()}/{prefix}-spool.sqlite3",
            "BENCH_QUEUE": f"{prefix}.noop",
        }
    )
    with tempfile.NamedTemporaryFile(suffix=".form", delete=False) as body_file:
        body_file.write(deal_body(TOKEN))
    worker_log = tempfile.TemporaryFile()  # noqa: SIM115 - read if the worker dies, closed below
    worker = subprocess.Popen(
        [sys.executable, "-m", "b24queue", "worker", "bench.noop:Noop"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=worker_log,
    )
    port = free_port()
    ingress = Server(
        [
            *(sys.executable, "-m", "b24queue", "ingress", "--host", "127.0.0.1"),
            *("--port", str(port), "--processes", str(args.processes)),
        ],
        env,
        port,
    )
    samples: list[tuple[float, float, float]] = []
    try:
        ingress.wait_ready("/readyz")
        load = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.load",
                "--url",
                ingress.url,
                "--body-file",
                body_file.name,
                "--requests",
                str(int(args.rate * args.seconds)),
                "--concurrency",
                "64",
                "--rate",
                str(args.rate),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        started = time.monotonic()
        while load.poll() is None:
            if worker.poll() is not None:  # a soak without its worker measures nothing
                load.kill()
                worker_log.seek(0)
                tail = worker_log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"the worker exited ({worker.returncode}): {tail}")
            # The ingress: its processes together (the parent and each child).
            ingress_mb = sum(rss_mb(pid) for pid in ingress.pids())
            samples.append((round(time.monotonic() - started, 1), ingress_mb, rss_mb(worker.pid)))
            time.sleep(5)
        result = json.loads(load.communicate()[0])
        left = asyncio.run(drained(env["BENCH_QUEUE"], timeout_s=60))
    finally:
        ingress.stop()
        worker.terminate()
        worker.wait(timeout=30)
        worker_log.close()
        asyncio.run(cleanup(prefix))
        os.unlink(body_file.name)
    print(f"load: {result}")
    print(f"left in the worker's queue once the load ended (60 s at most): {left}")
    print(f"{'t (s)':>7} {'ingress MB':>11} {'worker MB':>10}")
    for t, i, w in samples[:: max(1, len(samples) // 12)]:
        print(f"{t:>7} {i:>11.1f} {w:>10.1f}")
    minute = max(1, 60 // 5)
    early, late = samples[minute : 2 * minute], samples[-minute:]
    if not early:  # a run under two minutes: its first sample stands in for the second minute
        early = samples[:1]
    if not early:
        print("no memory samples: the run ended before the first")
        return
    for name, col in (("ingress", 1), ("worker", 2)):
        a = sum(s[col] for s in early) / len(early)
        b = sum(s[col] for s in late) / len(late)
        since = "second minute" if len(samples) > 2 * minute else "first sample"
        print(
            f"{name}: {since} {a:.1f} MB, last minute {b:.1f} MB, growth {b - a:+.1f} MB "
            f"({(b - a) / a * 100:+.1f}%)"
        )


if __name__ == "__main__":
    main()
