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
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika

from b24queue import EventConsumer
from b24queue.events.forms import encode_form
from b24queue.queues import QueueSpec
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


def deal_body(
    token: str,
    domain: str = "acme.bitrix24.com",
    member_id: str = "5f2a9c3e1b7d4a6f8e0c2b4d6f8a0c1e",
) -> bytes:
    """A Bitrix24-shaped ONCRMDEALUPDATE body (what a bulk edit sends 10,000 times), from the
    portal `domain` whose id is `member_id`."""
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
                "member_id": member_id,
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
        settled = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                # Ten answers in a row, each on a new connection: with several ingress
                # processes, each must be connected before the load starts.
                for _ in range(10):
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=1):
                        pass
                if path == "/readyz" and not settled:
                    # Processes that share the socket but do not accept yet get no connections:
                    # ten ready answers can all come from the first one up. The others start
                    # within a second; one not yet connected to the broker would spool.
                    settled = True
                    time.sleep(1.5)
                    continue
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


def broker_cpu_s() -> float:
    """CPU seconds used so far by the local RabbitMQ node (its beam.smp; not a cluster's)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "beam.smp":
                continue
            cmdline = (entry / "cmdline").read_bytes()
            if b"rabbit" not in cmdline or b"b24c" in cmdline:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def spooled(port: int) -> float | None:
    """Events our ingress put in its spool (its metrics; None for a baseline without them): a
    run that measured the spool instead of the broker is void."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    found = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("b24queue_ingress_spooled_total")
    ]
    return sum(found) if found else 0.0


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


async def raw_publisher(
    exchange: str,
) -> tuple[aio_pika.abc.AbstractRobustConnection, Callable[[int], Awaitable[Any]]]:
    """A connection, and a confirmed persistent publish of event `i` on one channel of it: what
    the broker's own figures are measured with (no HTTP, no b24queue)."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    target = await channel.get_exchange(exchange)
    body = json.dumps({"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": "1"}}}).encode()

    def publish(i: int) -> Awaitable[Any]:
        message = aio_pika.Message(
            body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(i)
        )
        return target.publish(message, routing_key="ONCRMDEALUPDATE")

    return connection, publish


async def broker_ceiling(exchange: str, count: int, window: int) -> dict[str, Any]:
    """Raw confirmed persistent publishes from one channel, `window` in flight."""
    connection, publish = await raw_publisher(exchange)
    semaphore = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with semaphore:
            await publish(i)

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


async def broker_paced(exchange: str, rate: float, count: int) -> dict[str, Any]:
    """Raw confirmed persistent publishes at a steady rate, open loop (no HTTP, no load
    generator): the broker's own latency at that rate, from when each was due to its confirm."""
    from bench.load import percentile

    connection, publish = await raw_publisher(exchange)
    latencies: list[float] = []

    async def one(i: int, due: float) -> None:
        await publish(i)
        latencies.append(time.perf_counter() - due)

    await asyncio.gather(*(one(i, time.perf_counter()) for i in range(200)))  # warm up
    latencies.clear()
    started = time.perf_counter()
    sent = []
    for i in range(count):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*sent)
    await connection.close()
    latencies.sort()
    return {
        "rate": round(rate),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


async def prepare(settings: Any, sinks: tuple[str, str], work: str) -> None:
    """The topology every ingress and the ceiling publish into: each event goes to one quorum
    and one classic queue (what a deployment with an old classic consumer beside ours sees)."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    exchange = await declare_exchanges(channel, settings)
    for sink, kind in zip(sinks, ("quorum", "classic"), strict=True):
        queue = await channel.declare_queue(sink, durable=True, arguments={"x-queue-type": kind})
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


async def purge(*names: str) -> None:
    async def go(channel: Any) -> None:
        for name in names:
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


async def cleanup(
    prefix: str, queues: tuple[str, ...] = (), exchanges: tuple[str, ...] = ()
) -> None:
    """Deletes the run's queues, exchanges and policies: through the management API, all under
    `prefix`; where it does not answer (a broker without the plugin), over AMQP the `queues` and
    `exchanges` named, so that a run's results are not lost to its cleanup."""
    try:
        await _cleanup_by_prefix(prefix)
    except OSError:
        print("management API not reachable: deleting the run's queues over AMQP", flush=True)

        async def go(channel: Any) -> None:
            for name in queues:
                await channel.queue_delete(name)
            for name in exchanges:
                await channel.exchange_delete(name)

        await amqp_call(go)


async def _cleanup_by_prefix(prefix: str) -> None:
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


def workers(
    most: int,
    deadline: float,
    args: argparse.Namespace,
    work: str,
    env: dict[str, str],
    results: dict[str, Any],
) -> None:
    """Ours and the raw loop on the same quorum queue contents, rounds interleaved."""
    event_json = json.dumps(
        {
            "event": "ONCRMDEALUPDATE",
            "data": {"FIELDS": {"ID": "1"}},
            "ts": "1764367200",
            "auth": {"domain": "acme.bitrix24.com"},
        }
    )
    for _ in rounds(most, deadline, "worker", results):
        for kind in ("plain", "b24queue"):
            print(f"worker {kind} ...", flush=True)
            asyncio.run(fill(work, event_json.encode(), args.worker_messages))
            result = consume(kind, work, args.worker_messages, args.prefetch, env)
            key = f"worker_{kind}"
            if key not in results or result["per_s"] > results[key]["per_s"]:
                results[key] = result
            results.setdefault("worker_rounds", {}).setdefault(kind, []).append(result)
            asyncio.run(purge(work))


def half_rates(
    paced: tuple[str, ...],
    serve: Callable[[str, float], dict[str, Any]],
    broker_alone: Callable[[float], dict[str, Any]],
    args: argparse.Namespace,
    results: dict[str, Any],
    deadline: float,
) -> None:
    """Each paced server at half of its own peak, in interleaved rounds (up to 3): one five-second
    run's p99 is its 250 slowest requests or fewer, which one moment of a shared machine moves.
    Beside them, the broker alone at the half rate of ours (one process): its own p99 there."""
    rates = {name: max(1.0, results[name]["rps"] / 2) for name in paced}
    runs: dict[str, list[dict[str, Any]]] = results.setdefault("half_rate_rounds", {})
    for _ in rounds(min(3, args.rounds), deadline, "half_rate", results):
        for name in paced:
            runs.setdefault(name, []).append(serve(name, rates[name]))
        alone = broker_alone(rates["b24queue_ingress_1_process"])
        results.setdefault("broker_paced_rounds", []).append(alone)
    for name, each in runs.items():  # the table shows each one's median round by p99
        by_p99 = sorted(each, key=lambda one: float(one["p99_ms"]))
        results[f"{name}_half_rate"] = by_p99[len(by_p99) // 2]


def steady(
    paced: tuple[str, ...],
    serve: Callable[[str, float], dict[str, Any]],
    args: argparse.Namespace,
    results: dict[str, Any],
    deadline: float,
) -> None:
    """Each paced server at one steady rate, in interleaved rounds: its floor compares CPU per
    request, which a moment of a shared machine's noise moves by a tenth or more in one run.

    The rate is one every one of them sustains: past its peak an open loop measures a server
    saturated and queueing, not its cost at that rate (a slow machine gets a lower one)."""
    steady_rate = min(args.steady_rate, 0.8 * min(results[name]["rps"] for name in paced))
    results["steady_rate"] = steady_rate = float(round(steady_rate, -1))
    if steady_rate < args.steady_rate:
        print(f"steady rate {steady_rate:g}/s: {args.steady_rate:g}/s is past a peak here")
    steady_rounds: dict[str, list[dict[str, Any]]] = results.setdefault("steady_rounds", {})
    for _ in rounds(args.rounds, deadline, "steady", results):
        for name in paced:
            steady_rounds.setdefault(name, []).append(serve(name, steady_rate))
    for name, runs in steady_rounds.items():  # the table shows each one's median round
        by_cpu = sorted(runs, key=lambda one: float(one["cpu_us_per_request"]))
        results[f"{name}_steady"] = by_cpu[len(by_cpu) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--worker-messages", type=int, default=20000)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; best counts")
    parser.add_argument(
        "--steady-rate", type=float, default=2000, help="the rate at which CPU is compared"
    )
    parser.add_argument("--ingress-only", action="store_true", help="skip the worker part")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=480,
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
    sinks, work = (f"{prefix}.sink", f"{prefix}.sink-classic"), f"{prefix}.work"
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
    asyncio.run(prepare(settings, sinks, work))
    try:

        def ceiling_round() -> None:
            print("broker ceiling ...", flush=True)
            broker_before = broker_cpu_s()
            ceiling = asyncio.run(broker_ceiling(settings.exchange, args.requests * 2, window=256))
            ceiling["broker_us_per_event"] = round(
                (broker_cpu_s() - broker_before) / ceiling["count"] * 1e6, 1
            )
            asyncio.run(purge(*sinks))
            results.setdefault("broker_ceiling_rounds", []).append(ceiling)
            if ceiling["per_s"] > results.get("broker_ceiling", {}).get("per_s", 0):
                results["broker_ceiling"] = ceiling

        def paced_broker_round(rate: float) -> dict[str, Any]:
            print(f"broker alone at {rate:.0f}/s ...", flush=True)
            try:
                return asyncio.run(broker_paced(settings.exchange, rate, int(rate * 5)))
            finally:
                asyncio.run(purge(*sinks))

        def serve(
            name: str, argv: list[str], ready_path: str, rate: float | None = None
        ) -> dict[str, Any]:
            print(f"{name}{f' at {rate:.0f}/s' if rate else ''} ...", flush=True)
            port = free_port()
            server = Server([*argv, "--port", str(port)], env, port)
            try:
                server.wait_ready(ready_path)
                cpu_before, broker_before = server.cpu_s(), broker_cpu_s()
                if rate is None:
                    result = load(server.url, body_file.name, args.requests, args.concurrency)
                else:  # about five seconds at a steady rate, open loop
                    result = load(
                        server.url, body_file.name, int(rate * 5), args.concurrency * 4, rate
                    )
                # CPU per request of the server (all its processes) and of the broker.
                result["cpu_us_per_request"] = round(
                    (server.cpu_s() - cpu_before) / result["requests"] * 1e6, 1
                )
                result["broker_us_per_event"] = round(
                    (broker_cpu_s() - broker_before) / result["requests"] * 1e6, 1
                )
                result["peak_rss_mb"] = server.peak_rss_mb()
                result["spooled"] = spooled(port)
                return result
            finally:
                server.stop()
                asyncio.run(purge(*sinks))

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
        # The ceiling too is the best of its rounds, taken among the others: a ceiling measured
        # once, at a slow moment or a fast one, would move every ratio against it.
        for _ in rounds(args.rounds, started + args.budget_s * 0.36, "ingress", results):
            ceiling_round()
            for name, (argv, ready) in servers.items():
                result = serve(name, argv, ready)
                results.setdefault("ingress_rounds", {}).setdefault(name, []).append(result)
                if name not in results or result["rps"] > results[name]["rps"]:
                    results[name] = result

        # Each at half of its own peak (the latency floor) and all at one steady rate (CPU per
        # request at equal broker work): CPU per event is steadier than throughput here.
        paced = ("plain_aiopika_ingress", "b24queue_ingress_1_process", "b24queue_ingress")
        half_rates(
            paced,
            lambda name, rate: serve(name, *servers[name], rate=rate),
            paced_broker_round,
            args,
            results,
            deadline=started + args.budget_s * 0.57,
        )
        steady(
            paced,
            lambda name, rate: serve(name, *servers[name], rate=rate),
            args,
            results,
            deadline=started + args.budget_s * 0.8,
        )

        worker_rounds = 0 if args.ingress_only else args.rounds
        workers(worker_rounds, started + args.budget_s * 0.97, args, work, env, results)
    finally:
        # The worker's consumer declares its retry queues with the default delays.
        spec = QueueSpec(work, ("BENCHWORK",), (1.0, *EventConsumer.retry_delays_s))
        retries = tuple(spec.retry_queue(d) for d in sorted(set(spec.retry_delays_s)))
        declared = (*sinks, work, spec.dlq, *retries, settings.unrouted)
        asyncio.run(cleanup(prefix, declared, (settings.exchange, settings.unrouted)))
        os.unlink(body_file.name)

    results["wall_s"] = round(time.monotonic() - started, 1)
    report(results)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / time.strftime("bench-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {out.relative_to(ROOT)}")


def report(r: dict[str, Any]) -> None:
    """The table issue 13 judges by: per server req/s, CPU per request (saturated and at one
    steady rate), the broker's CPU per event, p99 at half its own peak, spooled events; then the
    worker beside the raw loop, and each floor with its verdict."""
    procs = r["params"].get("processes", 1)
    steady = r.get("steady_rate", r["params"].get("steady_rate", 2000))
    ceiling = r["broker_ceiling"]
    names = {
        "bare_http": "bare aiohttp (no broker)",
        "plain_aiopika_ingress": "hand-written aio-pika ingress",
        "b24queue_ingress_1_process": "b24queue ingress, 1 process",
        "b24queue_ingress": f"b24queue ingress, {procs} processes",
    }

    def cell(name: str, suffix: str, key: str) -> str:
        value = r.get(f"{name}{suffix}", {}).get(key)
        return "-" if value is None else f"{value:g}"

    header = (
        "server",
        "req/s",
        "CPU us/req",
        "broker us/ev",
        f"CPU us/req @{steady:g}/s",
        "p99 ms @half peak",
        "spooled",
    )
    rows = [
        (
            "broker ceiling (raw confirmed publishes, 256 in flight)",
            f"{ceiling['per_s']:.0f}",
            "-",
            f"{ceiling.get('broker_us_per_event', '-')}",
            "-",
            "-",
            "-",
        )
    ]
    for name, label in names.items():
        if name not in r:
            continue
        rows.append(
            (
                label,
                f"{r[name]['rps']:.0f}",
                cell(name, "", "cpu_us_per_request"),
                cell(name, "", "broker_us_per_event"),
                cell(name, "_steady", "cpu_us_per_request"),
                cell(name, "_half_rate", "p99_ms"),
                " ".join(cell(name, suffix, "spooled") for suffix in ("", "_half_rate", "_steady")),
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print(
            "  ".join(
                f"{v:<{w}}" if i == 0 else f"{v:>{w}}"
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    non200 = {k: v["not_ok"] for k, v in r.items() if isinstance(v, dict) and "not_ok" in v}
    print(f"non-200 answers: {non200}")
    if r.get("worker_rounds"):
        from bench.consume import summary

        print(summary(r["worker_rounds"]))
    print()
    for verdict in floors(r):
        print(verdict)
    done = r.get("rounds", {})
    print(
        f"best of {done.get('ingress', 0)} ingress rounds, {done.get('steady', 0)} steady-rate "
        f"and {done.get('worker', 0)} worker rounds; whole run {r.get('wall_s', '?')} s"
    )


def p99_rounds(r: dict[str, Any]) -> list[str]:
    """Each round's p99 at half the peak, ours and the broker alone at ours' half rate."""
    out = []
    for name in ("b24queue_ingress_1_process", "b24queue_ingress"):
        values = " ".join(f"{x['p99_ms']:g}" for x in r.get("half_rate_rounds", {}).get(name, []))
        out.append(f"       {name} p99 ms at half its peak, per round: {values or '-'}")
    alone = r.get("broker_paced_rounds", [])
    if alone:
        values = " ".join(f"{x['p99_ms']:g}" for x in alone)
        out.append(
            f"       the broker alone at {alone[0]['rate']}/s (raw publishes, no HTTP), "
            f"p99 ms per round: {values}"
        )
    return out


def floors(r: dict[str, Any]) -> list[str]:
    """Issue 13's floors, each with the figures it compares and whether it is met."""
    out = []

    def check(what: str, value: float | None, limit: float, at_most: bool) -> None:
        if value is None:
            out.append(f"floor  {what}: not measured")
            return
        met = value <= limit if at_most else value >= limit
        sign = "<=" if at_most else ">="
        out.append(f"floor  {what}: {value:.2f} ({sign} {limit:g}) {'met' if met else 'NOT met'}")

    def get(name: str, key: str) -> float | None:
        value = r.get(name, {}).get(key)
        return float(value) if value is not None else None

    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    one, plain = "b24queue_ingress_1_process", "plain_aiopika_ingress"
    check(
        "ingress CPU/request vs hand-written, saturated (1 process)",
        over(get(one, "cpu_us_per_request"), get(plain, "cpu_us_per_request")),
        0.8,
        True,
    )
    # At the steady rate, round by round (each round's ours over its hand-written), median.
    steady = r.get("steady_rounds", {})
    pairs = list(zip(steady.get(one, []), steady.get(plain, []), strict=False))
    ratios = sorted(o["cpu_us_per_request"] / p["cpu_us_per_request"] for o, p in pairs)
    if ratios:
        each = " ".join(f"{x:.2f}" for x in ratios)
        out.append(f"       steady-rate CPU, ours over hand-written, per round: {each}")
    check(
        f"ingress CPU/request vs hand-written at {r.get('steady_rate', 2000):g}/s "
        "(1 process, median of rounds)",
        ratios[len(ratios) // 2] if ratios else None,
        0.8,
        True,
    )
    check(
        "ingress req/s vs hand-written (1 process)",
        over(get(one, "rps"), get(plain, "rps")),
        1.15,
        False,
    )
    ours_rounds = r.get("ingress_rounds", {}).get(one, [])
    pairs = list(zip(ours_rounds, r.get("broker_ceiling_rounds", []), strict=False))
    if pairs:
        each = " ".join(f"{o['rps'] / c['per_s']:.2f}" for o, c in pairs)
        out.append(f"       req/s, ours (1 process) over the ceiling of the same round: {each}")
    check(
        "ingress req/s vs broker ceiling (1 process)",
        over(get(one, "rps"), get("broker_ceiling", "per_s")),
        0.75,
        False,
    )
    out.extend(p99_rounds(r))
    for name in (one, "b24queue_ingress"):
        check(
            f"{name} p99 ms at half its peak (median of rounds)",
            get(f"{name}_half_rate", "p99_ms"),
            25,
            True,
        )
    # The worker, round by round (each round's ours over the raw loop's), median of the rounds.
    rounds_of = r.get("worker_rounds", {})
    pairs = list(zip(rounds_of.get("b24queue", []), rounds_of.get("plain", []), strict=False))
    for what, key, invert in (
        ("msg/s", "per_s", False),
        ("messages per CPU second", "cpu_us_per_msg", True),
    ):
        ratios = sorted(
            (p[key] / o[key]) if invert else (o[key] / p[key])
            for o, p in pairs
            if o[key] and p[key]
        )
        median = ratios[len(ratios) // 2] if ratios else None
        check(f"worker {what} vs raw loop (median of rounds)", median, 0.9, False)
    spooled = sum(float(v.get("spooled") or 0) for v in r.values() if isinstance(v, dict))
    out.append(f"spooled during the run: {spooled:g} events" + (" (VOID)" if spooled else ""))
    return out


if __name__ == "__main__":
    main()
