"""Load generator, run as its own process: POST a form body N times at a fixed concurrency (or a
fixed rate), and report throughput and latency percentiles as one JSON line on stdout."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run(
    url: str, body: bytes, requests: int, concurrency: int, rate: float | None
) -> dict[str, float]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
            latencies.append(time.perf_counter() - t0)

        # Warm up connections and the server's first-request paths.
        await asyncio.gather(*(one() for _ in range(min(200, requests))))
        latencies.clear()
        statuses.clear()
        started = time.perf_counter()
        if rate is None:
            remaining = requests

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await one()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            # Open loop: start requests on a fixed schedule, whatever the latency.
            tasks = []
            for i in range(requests):
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "ok": statuses.get(200, 0),
        "not_ok": sum(v for k, v in statuses.items() if k != 200),
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=None)
    args = parser.parse_args()
    with open(args.body_file, "rb") as f:
        body = f.read()
    result = asyncio.run(run(args.url, body, args.requests, args.concurrency, args.rate))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
