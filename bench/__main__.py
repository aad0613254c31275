"""`make bench`: one run, one table, every figure beside the baselines measured in the same run.

Load comes from a separate process (bench.load) on loopback, bounded in count and time. Every
server under test is its own process too. Results also go to bench/results/<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika

from b24queue.forms import encode_form
from b24queue.layout import QueueSpec
from b24queue.settings import load_settings
from b24queue.transports.amqp.topology import declare_consumer_queues, declare_exchanges

ROOT = Path(__file__).resolve().parents[1]
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
TOKEN = "bench-token-0123456789abcdef0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def deal_body(token: str) -> bytes:
    """A Bitrix24-shaped ONCRMDEALUPDATE body (what a bulk edit sends 10,000 times)."""
    domain = "acme.bitrix24.com"
    return encode_form(
        {
            "event": "ONCRMDEALUPDATE",
            "event_handler_id": "42",
            "data": {"FIELDS": {"ID": "1187"}},
            "ts": str(int(time.time())),
            "auth": {
                "access_token": "b7c6e8f1a2d34e5f9a0b1c2d3e4f5a6b",
                "expires": "1764370800",
                "expires_in": "3600",
                "scope": "crm,task,imbot,placement,user_brief",
                "domain": domain,
                "server_endpoint": "https://oauth.bitrix.info/rest/",
                "status": "L",
                "client_endpoint": f"https://{domain}/rest/",
                "member_id": "5f2a9c3e1b7d4a6f8e0c2b4d6f8a0c1e",
                "user_id": "1",
                "refresh_token": "a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1",
                "application_token": token,
            },
        }
    )


class Server:
    """A server process under test; waits until it answers."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/b24/events"
        self.proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def wait_ready(self, path: str) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                # Ten answers in a row, each on a new connection: with several ingress
                # processes, each must be connected before the load starts.
                for _ in range(10):
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=1):
                        pass
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 503 and path != "/readyz":
                    return  # it answers: a 404 is fine for the baselines
                time.sleep(0.1)
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def pids(self) -> list[int]:
        """The server process and its children (several ingress processes)."""
        found = [self.proc.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(stat[1]) == self.proc.pid:
                    found.append(int(entry.name))
        return found

    def cpu_s(self) -> float:
        """User + system CPU seconds the server's processes have used so far."""
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        """The largest peak RSS among the server's processes (each serves on its own)."""
        peaks = []
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        return round(max(peaks), 1) if peaks else float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(
    url: str, body_file: str, requests: int, concurrency: int, rate: float | None = None
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "bench.load",
        "--url",
        url,
        "--body-file",
        body_file,
        "--requests",
        str(requests),
        "--concurrency",
        str(concurrency),
    ]
    if rate is not None:
        argv += ["--rate", str(rate)]
    out = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=240).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def consume(
    kind: str, queue: str, count: int, prefetch: int, settings_env: dict[str, str]
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "bench.consume",
        kind,
        "--queue",
        queue,
        "--count",
        str(count),
        "--prefetch",
        str(prefetch),
        "--amqp-url",
        AMQP_URL,
        "--exchange",
        settings_env["B24QUEUE_EXCHANGE"],
        "--unrouted",
        settings_env["B24QUEUE_UNROUTED"],
        "--binding",
        "BENCHWORK",
    ]
    started = time.perf_counter()
    # The worker logs a line per event (as `b24queue worker` does): to a file, not a pipe that
    # nobody reads until the end.
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors)
        peak = 0.0
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
            except FileNotFoundError:
                break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=240)
        if proc.returncode != 0:
            errors.seek(0)
            raise RuntimeError(errors.read().decode(errors="replace")[-2000:])
    result: dict[str, Any] = json.loads(out)
    result["peak_rss_mb"] = round(peak, 1)
    result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


async def broker_ceiling(exchange: str, count: int, window: int) -> dict[str, Any]:
    """Raw confirmed persistent publishes from one channel, `window` in flight."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    target = await channel.get_exchange(exchange)
    body = json.dumps({"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": "1"}}}).encode()
    semaphore = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with semaphore:
            await target.publish(
                aio_pika.Message(
                    body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(i)
                ),
                routing_key="ONCRMDEALUPDATE",
            )

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.perf_counter() - started
    await connection.close()
    return {
        "count": count,
        "window": window,
        "seconds": round(elapsed, 3),
        "per_s": round(count / elapsed, 1),
    }


async def prepare(settings: Any, sink: str, work: str) -> None:
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    exchange = await declare_exchanges(channel, settings)
    queue = await channel.declare_queue(sink, durable=True, arguments={"x-queue-type": "quorum"})
    await queue.bind(exchange, routing_key="#")
    await declare_consumer_queues(channel, settings, QueueSpec(work, ("BENCHWORK",), (1.0,)))
    await connection.close()


async def amqp_call(fn: Any) -> Any:
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await connection.channel()
        return await fn(channel)
    finally:
        await connection.close()


async def purge(name: str) -> None:
    async def go(channel: Any) -> None:
        queue = await channel.get_queue(name)
        await queue.purge()

    await amqp_call(go)


async def fill(name: str, body: bytes, count: int) -> None:
    async def go(channel: Any) -> None:
        semaphore = asyncio.Semaphore(500)

        async def one(i: int) -> None:
            async with semaphore:
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=f"w{i}",
                        content_type="application/json",
                    ),
                    routing_key=name,
                )

        await asyncio.gather(*(one(i) for i in range(count)))

    await amqp_call(go)


async def cleanup(prefix: str) -> None:
    import base64
    from urllib.parse import quote

    import aiohttp

    auth = base64.b64encode(b"guest:guest").decode()
    async with aiohttp.ClientSession(headers={"Authorization": f"Basic {auth}"}) as session:
        for kind in ("queues", "exchanges", "policies"):
            async with session.get(f"http://127.0.0.1:15672/api/{kind}/%2F?columns=name") as r:
                items = await r.json()
            for item in items:
                if item["name"].startswith((prefix + ".", f"b24queue.{prefix}.")):
                    name = quote(item["name"], safe="")
                    async with session.delete(f"http://127.0.0.1:15672/api/{kind}/%2F/{name}"):
                        pass


def rounds(most: int, deadline: float, what: str, results: dict[str, Any]) -> Iterator[int]:
    """Up to `most` rounds; after the first, another only if one more like the longest so far
    still ends before `deadline`. Records how many ran."""
    longest = 0.0
    for n in range(most):
        now = time.monotonic()
        if n and now + longest > deadline:
            print(f"{what}: {n} of {most} rounds (time budget)", flush=True)
            break
        yield n
        longest = max(longest, time.monotonic() - now)
        results.setdefault("rounds", {})[what] = n + 1


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--worker-messages", type=int, default=20000)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; best counts")
    parser.add_argument("--ingress-only", action="store_true", help="skip the worker part")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=240,
        help="wall-time budget: a slow machine runs fewer rounds (at least one of each)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="B24QUEUE_INGRESS_PROCESSES for ours (default: one per core); it runs with 1 too",
    )
    args = parser.parse_args()

    prefix = f"bench{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("B24QUEUE_")}
    env.update(
        {
            "B24QUEUE_AMQP_URL": AMQP_URL,
            "B24QUEUE_EXCHANGE": f"{prefix}.events",
            "B24QUEUE_UNROUTED": f"{prefix}.unrouted",
            "B24QUEUE_APP_TOKENS": TOKEN,
            "B24QUEUE_LOG_LEVEL": "WARNING",
            "B24QUEUE_PUBLISH_TIMEOUT_S": "5",
        }
    )
    settings = load_settings(
        amqp_url=AMQP_URL, exchange=env["B24QUEUE_EXCHANGE"], unrouted=env["B24QUEUE_UNROUTED"]
    )
    sink, work = f"{prefix}.sink", f"{prefix}.work"
    body = deal_body(TOKEN)
    with tempfile.NamedTemporaryFile(suffix=".form", delete=False) as body_file:
        body_file.write(body)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "params": vars(args),
    }
    started = time.monotonic()
    asyncio.run(prepare(settings, sink, work))
    try:
        print("broker ceiling ...", flush=True)
        results["broker_ceiling"] = asyncio.run(
            broker_ceiling(settings.exchange, args.requests * 2, window=256)
        )
        asyncio.run(purge(sink))

        def serve(name: str, argv: list[str], ready_path: str) -> dict[str, Any]:
            print(f"{name} ...", flush=True)
            port = free_port()
            server = Server([*argv, "--port", str(port)], env, port)
            try:
                server.wait_ready(ready_path)
                result = load(server.url, body_file.name, args.requests, args.concurrency)
                result["peak_rss_mb"] = server.peak_rss_mb()
                return result
            finally:
                server.stop()
                asyncio.run(purge(sink))

        py = sys.executable
        servers = {
            "bare_http": ([py, "-m", "bench.baselines", "bare"], "/x"),
            "plain_aiopika_ingress": (
                [py, "-m", "bench.baselines", "plain", "--exchange", settings.exchange],
                "/x",
            ),
            "b24queue_ingress_1_process": (
                [py, "-m", "b24queue", "ingress", "--host", "127.0.0.1", "--processes", "1"],
                "/readyz",
            ),
            "b24queue_ingress": (
                [
                    *(py, "-m", "b24queue", "ingress", "--host", "127.0.0.1"),
                    *("--processes", str(args.processes)),
                ],
                "/readyz",
            ),
        }
        # Rounds interleaved, best of each: a 2-core machine shared with the broker and the
        # load generator is noisy, and interleaving keeps a slow moment from hitting one side.
        # A slow machine gets fewer rounds, so that the whole run stays within its budget.
        for _ in rounds(args.rounds, started + args.budget_s * 0.6, "ingress", results):
            for name, (argv, ready) in servers.items():
                result = serve(name, argv, ready)
                if name not in results or result["rps"] > results[name]["rps"]:
                    results[name] = result

        # Latency at the same steady rate (half of our peak) for ours and the plain ingress.
        half = max(1.0, results["b24queue_ingress"]["rps"] / 2)
        for name in ("plain_aiopika_ingress", "b24queue_ingress"):
            print(f"{name} at {half:.0f}/s ...", flush=True)
            argv, ready = servers[name]
            port = free_port()
            server = Server([*argv, "--port", str(port)], env, port)
            try:
                server.wait_ready(ready)
                cpu_before = server.cpu_s()
                paced = load(
                    server.url, body_file.name, int(half * 5), args.concurrency * 4, rate=half
                )
                # CPU per request at the same rate: steadier than throughput on a busy machine.
                paced["cpu_us_per_request"] = round(
                    (server.cpu_s() - cpu_before) / paced["requests"] * 1e6, 1
                )
                results[f"{name}_half_rate"] = paced
            finally:
                server.stop()
                asyncio.run(purge(sink))

        event_json = json.dumps(
            {
                "event": "ONCRMDEALUPDATE",
                "data": {"FIELDS": {"ID": "1"}},
                "ts": "1764367200",
                "auth": {"domain": "acme.bitrix24.com"},
            }
        )
        worker_rounds = 0 if args.ingress_only else args.rounds
        for _ in rounds(worker_rounds, started + args.budget_s * 0.95, "worker", results):
            for kind in ("plain", "b24queue"):
                print(f"worker {kind} ...", flush=True)
                asyncio.run(fill(work, event_json.encode(), args.worker_messages))
                result = consume(kind, work, args.worker_messages, args.prefetch, env)
                key = f"worker_{kind}"
                if key not in results or result["per_s"] > results[key]["per_s"]:
                    results[key] = result
                results.setdefault("worker_rounds", {}).setdefault(kind, []).append(result)
                asyncio.run(purge(work))
    finally:
        asyncio.run(cleanup(prefix))
        os.unlink(body_file.name)

    results["wall_s"] = round(time.monotonic() - started, 1)
    report(results)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / time.strftime("bench-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {out.relative_to(ROOT)}")


def report(r: dict[str, Any]) -> None:
    if "worker_b24queue" not in r:
        r = {
            **r,
            "worker_b24queue": {"per_s": 0.0, "peak_rss_mb": 0.0},
            "worker_plain": {"per_s": 0.0, "peak_rss_mb": 0.0},
        }
    ours = r["b24queue_ingress"]
    one = r.get("b24queue_ingress_1_process", ours)
    procs = r["params"].get("processes", 1)
    plain = r["plain_aiopika_ingress"]
    bare = r["bare_http"]
    ceiling = r["broker_ceiling"]
    half = r["b24queue_ingress_half_rate"]
    plain_half = r["plain_aiopika_ingress_half_rate"]
    wo, wp = r["worker_b24queue"], r["worker_plain"]
    rows = [
        ("broker ceiling (confirmed publishes/s, 256 in flight)", f"{ceiling['per_s']:.0f}", ""),
        (
            "bare aiohttp, no broker (req/s)",
            f"{bare['rps']:.0f}",
            f"p50 {bare['p50_ms']} ms, p99 {bare['p99_ms']} ms",
        ),
        (
            "plain aio-pika ingress (req/s)",
            f"{plain['rps']:.0f}",
            f"p50 {plain['p50_ms']} ms, p99 {plain['p99_ms']} ms",
        ),
        (
            "b24queue ingress, 1 process (req/s)",
            f"{one['rps']:.0f}",
            f"{ratio(one['rps'], plain['rps'])} plain, "
            f"{ratio(one['rps'], ceiling['per_s'])} ceiling; "
            f"p50 {one['p50_ms']} ms, p99 {one['p99_ms']} ms",
        ),
        (
            f"b24queue ingress, {procs} processes (req/s)",
            f"{ours['rps']:.0f}",
            f"{ratio(ours['rps'], plain['rps'])} plain, "
            f"{ratio(ours['rps'], ceiling['per_s'])} ceiling, "
            f"{ratio(ours['rps'], bare['rps'])} bare; "
            f"p50 {ours['p50_ms']} ms, p99 {ours['p99_ms']} ms",
        ),
        (
            f"b24queue ingress ({procs} proc.) at half peak ({half['rps']:.0f} req/s)",
            f"p99 {half['p99_ms']} ms",
            f"p50 {half['p50_ms']} ms; plain at the same rate: p50 {plain_half['p50_ms']} ms, "
            f"p99 {plain_half['p99_ms']} ms; non-200: {half['not_ok']}",
        ),
        (
            "ingress CPU per request at that rate (us, all processes)",
            f"{half['cpu_us_per_request']}",
            f"plain {plain_half['cpu_us_per_request']} us "
            f"({ratio(half['cpu_us_per_request'], plain_half['cpu_us_per_request'])} plain's)",
        ),
        (
            "plain consume-and-ack loop (msg/s)",
            f"{wp['per_s']:.0f}",
            f"{wp.get('cpu_us_per_msg', '-')} us CPU/msg; peak RSS {wp['peak_rss_mb']} MB",
        ),
        (
            "b24queue worker, no-op handler, INFO line per event (msg/s)",
            f"{wo['per_s']:.0f}",
            f"{ratio(wo['per_s'], wp['per_s'])} plain; {wo.get('cpu_us_per_msg', '-')} us CPU/msg "
            f"({ratio(wp.get('cpu_us_per_msg', 0), wo.get('cpu_us_per_msg', 0))} plain's pace "
            f"per CPU); peak RSS {wo['peak_rss_mb']} MB",
        ),
        (
            "peak RSS ingress (MB, largest process)",
            f"{ours['peak_rss_mb']}",
            f"plain {plain['peak_rss_mb']} MB, bare {bare['peak_rss_mb']} MB",
        ),
    ]
    non200 = {k: v["not_ok"] for k, v in r.items() if isinstance(v, dict) and "not_ok" in v}
    width = max(len(a) for a, _, _ in rows)
    print()
    print(f"{'measurement':<{width}}  {'value':>10}  vs baselines")
    for a, b, c in rows:
        print(f"{a:<{width}}  {b:>10}  {c}")
    print(f"non-200 answers: {non200}")
    if r.get("worker_rounds"):
        from bench.consume import summary

        print(summary(r["worker_rounds"]))
    done = r.get("rounds", {})
    print(
        f"best of {done.get('ingress', 0)} ingress and {done.get('worker', 0)} worker rounds; "
        f"whole run {r.get('wall_s', '?')} s"
    )


if __name__ == "__main__":
    main()
