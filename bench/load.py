"""Load generator, run as its own process: POST a form body N times at a fixed concurrency (or a
fixed rate), and report throughput and latency percentiles as one JSON line on stdout.

It speaks just enough HTTP/1.1 over raw keep-alive connections (a prepared request, responses
read by Content-Length) so that it costs the shared two cores as little as it can: an
aiohttp client spent about as much CPU per request as the server it measured. Latency is timed
from when a request was due (open loop) or sent (fixed concurrency) to its last response byte.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from typing import cast
from urllib.parse import urlsplit

import uvloop


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class Client(asyncio.Protocol):
    """One keep-alive connection; one request at a time on it."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.started = 0.0
        self.status = 0
        self.need = -1  # total bytes of the response under way, once its headers are in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def send(self, started: float) -> None:
        assert self.transport is not None
        self.started = started
        self.transport.write(self.pool.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).lower()
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.startswith(b"content-length:"):
                        length = int(line[15:])
                self.status = int(head[9:12])
                self.need = end + 4 + length
            if len(self.buffer) < self.need:
                return
            del self.buffer[: self.need]
            self.need = -1
            self.pool.done(self, self.status, time.perf_counter() - self.started)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.closed(self)


class Pool:
    def __init__(self, url: str, body: bytes, requests: int) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.request = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.to_send = requests  # closed loop: requests not sent yet
        self.due: collections.deque[float] = collections.deque()  # open loop: waiting for a client
        self.idle: list[Client] = []
        self.latencies: list[float] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.outstanding = requests
        self.finished = asyncio.get_running_loop().create_future()
        self.open_loop = False

    async def connect(self, count: int) -> list[Client]:
        loop = asyncio.get_running_loop()
        clients = []
        for _ in range(count):
            _, client = await loop.create_connection(lambda: Client(self), self.host, self.port)
            clients.append(client)
        return clients

    def next_for(self, client: Client) -> None:
        if self.open_loop:
            if self.due:
                client.send(self.due.popleft())
            else:
                self.idle.append(client)
        elif self.to_send > 0:
            self.to_send -= 1
            client.send(time.perf_counter())

    def done(self, client: Client, status: int, latency: float) -> None:
        self.latencies.append(latency)
        self.statuses[status] += 1
        self.outstanding -= 1
        if self.outstanding == 0 and not self.finished.done():
            self.finished.set_result(None)
            return
        self.next_for(client)

    def closed(self, client: Client) -> None:
        if not self.finished.done():  # we close them only once all answers are in
            self.finished.set_exception(ConnectionError("the server closed a connection"))

    def submit(self, due: float) -> None:
        if self.idle:
            self.idle.pop().send(due)
        else:
            self.due.append(due)


def close(clients: list[Client]) -> None:
    for client in clients:
        if client.transport is not None:
            client.transport.close()


async def run(
    url: str, body: bytes, requests: int, concurrency: int, rate: float | None
) -> dict[str, float]:
    # Warm up connections and the server's first-request paths.
    warm = Pool(url, body, min(200, requests))
    warm_clients = await warm.connect(min(concurrency, warm.outstanding))
    for client in warm_clients:
        warm.next_for(client)
    await warm.finished
    close(warm_clients)

    pool = Pool(url, body, requests)
    clients = await pool.connect(concurrency)
    started = time.perf_counter()
    if rate is None:
        for client in clients:
            pool.next_for(client)
    else:
        # Open loop: requests are due on a fixed schedule, whatever the latency; one that finds
        # no free connection waits for one, and that wait counts in its latency.
        pool.open_loop = True
        pool.idle = list(clients)
        for i in range(requests):
            due = started + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pool.submit(due)
    await pool.finished
    elapsed = time.perf_counter() - started
    close(clients)
    latencies = sorted(pool.latencies)
    return {
        "requests": len(latencies),
        "ok": pool.statuses.get(200, 0),
        "not_ok": sum(v for k, v in pool.statuses.items() if k != 200),
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
    result = uvloop.run(run(args.url, body, args.requests, args.concurrency, args.rate))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
