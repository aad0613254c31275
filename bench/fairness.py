"""Issue 30's fairness benchmark: one portal's burst beside nineteen quiet portals, per transport,
with the fair share on and off.

  python -m bench.fairness [--transport sqlite|postgres|redis|amqp|kafka ...] [--burst N]

Per transport, a real `b24queue ingress` process and, for each setting of the consumer's
`fair_share` (off, then on), a real `b24queue worker` whose handler takes 20 ms (a portal call)
on 32 slots. Twenty portals (distinct member_ids and domains, Bitrix24-shaped ONCRMDEALUPDATE
bodies, the static application token) post through the ingress: first the nineteen quiet ones
alone, 5 events/s each, for `--quiet-s`; then the same while the twentieth posts `--burst` events
as fast as the load generator can (bench.load, 64 connections), until the worker has handled
everything. The ingress's per-portal rate limit is off (B24QUEUE_INGRESS_RATE_LIMIT=off): the
burst must reach the queue, not be refused with 429.

Reported: the quiet portals' posted->handler-start p50/p99 without the burst and during it (from
when this process sent the request, so the ingress's own time is included: an upper bound of
accepted->start, precise on every transport where RabbitMQ's message timestamp is whole seconds),
the burst's drain time (from its first request to its last event's handler start), CPU per event
of the ingress and the worker together over the burst, and issue 30's floors beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from b24queue import Event, EventConsumer
from b24queue.transports.amqp.layout import SHARDS
from bench.__main__ import AMQP_URL, ROOT, TOKEN, Server, amqp_call, deal_body, free_port, spooled
from bench.load import percentile
from bench.tables import QUEUES, cpu_s, server_env, topology

PORTALS = 20
QUIET_RATE = 5.0  # events a second from each quiet portal
HANDLE_S = 0.02
SLOTS = 32
CONSUMER = "bench.fairness:Portals"


def portal(i: int) -> tuple[str, str]:
    """The domain and member_id of portal `i` (0: the one that bursts)."""
    domain = f"portal{i:02d}.bitrix24.com"
    return domain, hashlib.md5(domain.encode()).hexdigest()  # an id, not a secret


BURSTING = portal(0)[1]


class Portals(EventConsumer):
    """The worker's consumer: notes each handler start (portal, message id, time) and takes
    20 ms; writes what it noted to BENCH_RECORD when it stops. BENCH_FAIR=0: `fair_share` off."""

    queue = os.environ.get("BENCH_QUEUE", "bench.fairness")
    events = ("#",)
    prefetch = SLOTS
    # The consumer attribute of issue 30; a tree without it ignores it (then on == off).
    fair_share = os.environ.get("BENCH_FAIR", "1") != "0"

    def __init__(self) -> None:
        self.starts: list[tuple[str, str, float, float | None]] = []

    async def handle(self, event: Event) -> None:
        accepted = event.accepted_at
        self.starts.append(
            (
                event.auth.member_id or "",
                event.message_id or "",
                time.time(),
                accepted.timestamp() if accepted is not None else None,
            )
        )
        await asyncio.sleep(HANDLE_S)

    async def on_stop(self) -> None:
        if path := os.environ.get("BENCH_RECORD"):
            Path(path).write_text(json.dumps(self.starts))  # noqa: ASYNC240 - once, at stop


ACCEPTED = "b24queue_ingress_accepted_total"
SETTLED = "b24queue_worker_events_total"


def metric_sum(port: int, name: str) -> float:
    """The sum of a metric's samples on a /metrics page (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(ln.split()[-1]) for ln in lines if ln.startswith(name))


class Quiet:
    """The nineteen quiet portals, each posting at QUIET_RATE, open loop (a request is sent when
    it is due, whatever the answers); notes when each accepted event was sent."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bodies = [deal_body(TOKEN, *portal(i)) for i in range(1, PORTALS)]
        self.sent: dict[str, float] = {}  # message_id -> when its request was sent (time.time)
        self.refused = 0

    async def run(self, session: Any, stop: asyncio.Event, until_s: float | None = None) -> None:
        started = time.monotonic()
        every = 1 / (QUIET_RATE * len(self.bodies))  # the portals in turn, evenly spread
        posts: set[asyncio.Task[None]] = set()
        n = 0
        while not stop.is_set() and (until_s is None or time.monotonic() - started < until_s):
            task = asyncio.create_task(self.post(session, self.bodies[n % len(self.bodies)]))
            posts.add(task)
            task.add_done_callback(posts.discard)
            n += 1
            delay = started + n * every - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*posts)

    async def post(self, session: Any, body: bytes) -> None:
        sent = time.time()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        async with session.post(self.url, data=body, headers=headers) as resp:
            if resp.status != 200:
                self.refused += 1
                return
            self.sent[(await resp.json())["message_id"]] = sent


async def until_handled(
    ingress_port: int,
    worker_port: int,
    before: float,
    timeout_s: float = 120,
    *,
    caught_up: bool = True,
) -> None:
    """Until the worker has settled every event the ingress accepted since it had accepted
    `before` (the worker's own count starts at 0). `caught_up` False: every event accepted when
    this was called, though more arrive meanwhile (the quiet portals still posting: waiting for
    a moment with none in a handler could wait forever)."""
    deadline = time.monotonic() + timeout_s
    accepted = settled = 0.0
    target = None if caught_up else metric_sum(ingress_port, ACCEPTED) - before
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # the worker's metrics not served yet: it starts
            accepted = metric_sum(ingress_port, ACCEPTED) - before
            settled = metric_sum(worker_port, SETTLED)
            if accepted and settled >= (accepted if target is None else target):
                return
        await asyncio.sleep(0.25)
    raise RuntimeError(
        f"the worker settled {settled:g} of {accepted:g} accepted events in {timeout_s:g} s"
    )


async def burst_load(url: str, body_file: Path, count: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.load", "--url", url, "--body-file", str(body_file)]
    argv += ["--requests", str(count), "--concurrency", "64"]
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("the load generator failed")
    result: dict[str, Any] = json.loads(out)
    return result


async def one_mode(
    ingress: Server, worker_port: int, worker_pid: int, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """Quiet portals alone, then beside the burst; what this process saw of them."""
    import aiohttp

    ingress_port = ingress.port
    body_file = tmp / "burst.form"
    body_file.write_bytes(deal_body(TOKEN, *portal(0)))
    alone, during = Quiet(ingress.url), Quiet(ingress.url)
    connector = aiohttp.TCPConnector(limit=64)
    before = metric_sum(ingress_port, ACCEPTED)

    async def handled(caught_up: bool = True) -> None:
        await until_handled(ingress_port, worker_port, before, caught_up=caught_up)

    async with aiohttp.ClientSession(connector=connector) as session:
        # Every portal's path once, and the worker consuming, before anything is timed.
        warm = Quiet(ingress.url)
        await asyncio.gather(*(warm.post(session, body) for body in warm.bodies))
        await handled()

        await alone.run(session, asyncio.Event(), until_s=args.quiet_s)
        await handled()

        cpu0 = ingress.cpu_s() + cpu_s(worker_pid)
        settled0 = metric_sum(worker_port, SETTLED)
        began = time.time()
        stop = asyncio.Event()
        quiet = asyncio.create_task(during.run(session, stop))
        load = await burst_load(ingress.url, body_file, args.burst)
        await handled(caught_up=False)  # the burst drained, the quiet portals still posting
        stop.set()
        await quiet
        await handled()
        cpu = ingress.cpu_s() + cpu_s(worker_pid) - cpu0
        events = metric_sum(worker_port, SETTLED) - settled0
    return {
        "alone": alone.sent,
        "during": during.sent,
        "began": began,
        "burst_load": load,
        "quiet_refused": alone.refused + during.refused,
        "cpu_us_per_event": round(cpu / events * 1e6, 1),
        "events": int(events),
    }


def summarise(seen: dict[str, Any], starts: list[list[Any]]) -> dict[str, Any]:
    """The figures of one mode, from what the driver sent and the worker's handler starts."""
    started = {row[1]: row for row in starts}
    burst = [row[2] for row in starts if row[0] == BURSTING]
    end = max(burst) if burst else seen["began"]

    def waits(sent: dict[str, float], since: float | None = None) -> dict[str, Any]:
        if since is not None:  # during the burst: sent from its first request to its last start
            sent = {m: t for m, t in sent.items() if since <= t <= end}
        posted = sorted(started[m][2] - t for m, t in sent.items() if m in started)
        accepted = sorted(
            started[m][2] - started[m][3]
            for m in sent
            if m in started and started[m][3] is not None
        )
        by_portal: dict[str, list[float]] = {}
        for m, t in sent.items():
            if m in started:
                by_portal.setdefault(started[m][0], []).append(started[m][2] - t)
        return {
            "events": len(posted),
            "p50_ms": round(percentile(posted, 0.5) * 1000, 1),
            "p99_ms": round(percentile(posted, 0.99) * 1000, 1),
            "accepted_p99_ms": round(percentile(accepted, 0.99) * 1000, 1),
            "lost": len(sent) - sum(m in started for m in sent),
            # Each quiet portal's own p99, the worst first (no names): one portal far above the
            # others is one that shares the burst's shard (RabbitMQ) or partition (Kafka).
            "p99_ms_by_portal": sorted(
                (round(percentile(sorted(w), 0.99) * 1000, 1) for w in by_portal.values()),
                reverse=True,
            ),
        }

    return {
        "quiet_alone": waits(seen["alone"]),
        "quiet_during_burst": waits(seen["during"], since=seen["began"]),
        "burst_events": len(burst),
        "burst_accepted_per_s": seen["burst_load"]["rps"],
        "burst_refused": seen["burst_load"]["not_ok"],
        "drain_s": round(end - seen["began"], 2),
        "cpu_us_per_event": seen["cpu_us_per_event"],
        "events_in_cpu_window": seen["events"],
        "quiet_refused": seen["quiet_refused"],
    }


@contextlib.contextmanager
def amqp_queue(tmp: Path, body: bytes, queue: str, baseline: bool = False) -> Iterator[Any]:
    """The machine's RabbitMQ (BENCH_AMQP_URL), under names of this run's own, deleted after
    (by AMQP: the management API may be off). The same shape as bench.tables.QUEUES."""
    prefix = queue.rsplit(".", 1)[0]
    os.environ["B24QUEUE_EXCHANGE"] = f"{prefix}.events"
    os.environ["B24QUEUE_UNROUTED"] = f"{prefix}.unrouted"
    try:
        yield AMQP_URL, 0.0, lambda: 0
    finally:
        for name in ("B24QUEUE_EXCHANGE", "B24QUEUE_UNROUTED"):
            os.environ.pop(name, None)

        async def delete(channel: Any) -> None:
            shards = (f".s{i}" for i in range(SHARDS))  # a fair queue's (docs/fairness.md)
            for suffix in ("", ".dlq", *(f".retry.{d:g}s" for d in Portals.retry_delays_s)):
                await channel.queue_delete(queue + suffix)
            for suffix in shards:
                await channel.queue_delete(queue + suffix)
            await channel.exchange_delete(queue + ".fair")
            await channel.queue_delete(f"{prefix}.unrouted")
            for name in (f"{prefix}.events", f"{prefix}.unrouted", f"{prefix}.events.unrouted"):
                await channel.exchange_delete(name)

        asyncio.run(amqp_call(delete))


def run_transport(name: str, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"benchf{uuid.uuid4().hex[:8]}"
    queue = f"{prefix}.fair"
    opener = amqp_queue if name == "amqp" else QUEUES[name]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with opener(tmp, b"", queue=queue, baseline=False) as (url, _, _):
            env = server_env(url, tmp)
            for key in ("B24QUEUE_EXCHANGE", "B24QUEUE_UNROUTED"):
                if key in os.environ:
                    env[key] = os.environ[key]
            env.update({"BENCH_QUEUE": queue, "B24QUEUE_INGRESS_RATE_LIMIT": "off"})
            # Declared as a queue made before the fair share (on RabbitMQ the fair one is its
            # shards): "off" runs on it as it was, "on" turns it fair in place.
            topology({**env, "BENCH_FAIR": "0"}, CONSUMER)
            port = free_port()
            ingress = Server(
                [
                    *(sys.executable, "-m", "b24queue", "ingress", "--host", "127.0.0.1", "--port"),
                    str(port),
                ],
                env,
                port,
            )
            try:
                ingress.wait_ready("/readyz")
                for fair in (False, True):
                    label = "fair_on" if fair else "fair_off"
                    print(f"{name}: fair_share {'on' if fair else 'off'} ...", flush=True)
                    results[label] = run_mode(name, url, env, ingress, fair, args, tmp)
                results["spooled"] = spooled(port)
            finally:
                ingress.stop()
    return results


def run_mode(
    name: str,
    url: str,
    env: dict[str, str],
    ingress: Server,
    fair: bool,
    args: argparse.Namespace,
    tmp: Path,
) -> dict[str, Any]:
    record = tmp / f"starts-{int(fair)}.json"
    worker_port = free_port()
    worker_env = {
        **env,
        "BENCH_FAIR": "1" if fair else "0",
        "BENCH_RECORD": str(record),
        "B24QUEUE_WORKER_METRICS_PORT": str(worker_port),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "b24queue", "worker", CONSUMER],
        env=worker_env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / f"worker-{int(fair)}.log").open("wb"),
    )
    try:
        if name == "kafka":
            from bench.kafka_queue import wait_for_member

            wait_for_member(url, env["BENCH_QUEUE"])
        seen = asyncio.run(one_mode(ingress, worker_port, worker.pid, args, tmp))
    finally:
        worker.terminate()
        worker.wait(60)
    if not record.exists():
        log = (tmp / f"worker-{int(fair)}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the worker wrote no record:\n{log}")
    return summarise(seen, json.loads(record.read_text()))


def floors(name: str, r: dict[str, Any]) -> list[str]:
    """Issue 30's floors, each with the figures it compares and whether it is met."""
    on, off = r["fair_on"], r["fair_off"]
    during, alone = on["quiet_during_burst"]["p99_ms"], on["quiet_alone"]["p99_ms"]
    checks = [
        ("quiet p99 during the burst (ms)", during, 250.0),
        ("quiet p99 during / without the burst", during / alone if alone else None, 3.0),
        ("drain time on / off", on["drain_s"] / off["drain_s"] if off["drain_s"] else None, 1.1),
        (
            "CPU per event on / off",
            on["cpu_us_per_event"] / off["cpu_us_per_event"] if off["cpu_us_per_event"] else None,
            1.15,
        ),
    ]
    out = []
    for what, value, limit in checks:
        if value is None:
            out.append(f"floor  {name}: {what}: not measured")
        else:
            met = "met" if value <= limit else "NOT met"
            out.append(f"floor  {name}: {what}: {value:.2f} (<= {limit:g}) {met}")
    return out


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    header = (
        "transport",
        "fair",
        "quiet p50/p99 ms alone",
        "quiet p50/p99 ms in burst",
        "burst drain s",
        "burst accepted/s",
        "CPU us/event",
        "lost",
    )
    rows = []
    for name, r in results.items():
        for label in ("fair_off", "fair_on"):
            m = r[label]
            a, d = m["quiet_alone"], m["quiet_during_burst"]
            rows.append(
                (
                    name,
                    label.removeprefix("fair_"),
                    f"{a['p50_ms']:g}/{a['p99_ms']:g}",
                    f"{d['p50_ms']:g}/{d['p99_ms']:g} ({d['events']} ev)",
                    f"{m['drain_s']:g} ({m['burst_events']} ev)",
                    f"{m['burst_accepted_per_s']:g}",
                    f"{m['cpu_us_per_event']:g}",
                    f"{a['lost'] + d['lost']}",
                )
            )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)))
    print()
    for name, r in results.items():
        for line in floors(name, r):
            print(line)
        for label in ("fair_off", "fair_on"):
            own = r[label]["quiet_during_burst"].get("p99_ms_by_portal", [])
            if own:
                shown = ", ".join(f"{v:g}" for v in own[:3])
                print(
                    f"       {name} {label}: quiet portals' own p99 in the burst, worst first: "
                    f"{shown} ... median {own[len(own) // 2]:g} ms"
                )
        if r.get("spooled"):
            print(f"       {name}: {r['spooled']:g} events went through the spool")
    if "fair_share" not in vars(EventConsumer):
        print("EventConsumer has no fair_share in this tree: on and off are the same consumer")
    print(
        f"burst {args.burst} events (+ the load generator's 200 warm-up ones) from one portal, "
        f"{PORTALS - 1} quiet portals at {QUIET_RATE:g}/s each, handler {HANDLE_S * 1000:g} ms, "
        f"{SLOTS} slots; the ingress's rate limit off; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--transport",
        action="append",
        choices=("sqlite", "postgres", "redis", "amqp", "kafka"),
        help="repeat for several; default: all five",
    )
    parser.add_argument("--burst", type=int, default=20000, help="events the busy portal posts")
    parser.add_argument(
        "--quiet-s", type=float, default=10, help="seconds of the quiet portals alone"
    )
    args = parser.parse_args()
    names = args.transport or ["sqlite", "postgres", "redis", "amqp", "kafka"]
    started = time.monotonic()
    results = {name: run_transport(name, args) for name in names}
    report(results, args)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / time.strftime("fairness-%Y%m%d-%H%M%S.json")
    params = {**vars(args), "wall_s": round(time.monotonic() - started, 1)}
    out.write_text(json.dumps({"params": params, "results": results}, indent=2))
    print(f"whole run {params['wall_s']} s; written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
