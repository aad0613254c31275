"""The Redis Streams transport's own traps, on a Redis the tests start (AOF, appendfsync always):
the persistence check, the CLI tour, two worker processes on one queue, workers' connections
killed under them."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from b24queue.settings import Settings, load_settings
from tests.support.bench import Bench
from tests.support.processes import cli, env_for, ingress_up, lines, post, start, stop
from tests.support.proxy import free_port
from tests.support.redis_server import RedisServer, redis_server
from tests.support.samples import SAMPLE_TOKEN
from tests.support.wait import wait_until


@pytest.fixture
def queue(redis_aof: RedisServer) -> Iterator[Settings]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield load_settings(
        broker_url=redis_aof.url,
        redis_prefix=prefix,
        app_tokens=SAMPLE_TOKEN,
        unrouted=f"{prefix}.unrouted",
        publish_timeout_s=3.0,
    )


async def test_the_ingress_refuses_a_redis_that_does_not_persist(tmp_path: Path) -> None:
    with redis_server(aof=False) as server:
        settings = load_settings(broker_url=server.url, app_tokens=SAMPLE_TOKEN)
        port = free_port()
        env = env_for(settings, tmp_path / "x.record")
        args = ("ingress", "--host", "127.0.0.1", "--port", str(port))
        proc = await start(*args, env=env, log=tmp_path / "refused.log")
        assert await asyncio.wait_for(proc.wait(), 30) != 0
        said = (tmp_path / "refused.log").read_text()
        assert "appendonly no" in said and "B24QUEUE_REDIS_ALLOW_UNSAFE" in said, said
        assert "Traceback" not in said, said
        # Opted out: it runs, and says so loudly.
        env["B24QUEUE_REDIS_ALLOW_UNSAFE"] = "true"
        proc = await start(*args, env=env, log=tmp_path / "unsafe.log")
        try:
            await wait_until(
                lambda: "UNSAFE" in (tmp_path / "unsafe.log").read_text(), 30, "the warning"
            )
        finally:
            assert await stop(proc) == 0


async def test_the_tour_on_redis(queue: Settings, tmp_path: Path) -> None:
    code, out = await cli(queue, "topology", "tests.support.consumers:Narrowing")
    assert code == 0 and "cli.deals.dlq" in out, out
    port = free_port()
    ingress = await ingress_up(queue, tmp_path, port)
    url = f"http://127.0.0.1:{port}/b24/events"
    code, out = await cli(queue, "send", "ONCRMDEALADD", "--url", url)
    assert code == 0 and out.startswith("200 "), out
    code, out = await cli(queue, "send", "ONTASKADD", "--url", url)  # nobody binds it
    assert code == 0, out
    assert await stop(ingress) == 0
    code, out = await cli(queue, "status", "--json")
    assert code == 0, out
    status = json.loads(out[out.index("{") :])
    [row] = status["queues"]
    assert (row["queue"], row["ready"], row["dead_letters"]) == ("cli.deals", 1, 0)
    assert status["unrouted"] == 1
    code, out = await cli(queue, "dlq", "list", queue.unrouted)
    assert code == 0 and "ONTASKADD" in out, out
    code, out = await cli(queue, "dlq", "purge", queue.unrouted, "--yes")
    assert code == 0 and "purged 1" in out, out


async def test_two_worker_processes_never_run_one_message_at_once(
    queue: Settings, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    env = env_for(queue, record, B24QT_SLEEP_S="0.01", B24QT_PREFETCH="8")
    code, out = await cli(queue, "topology", "tests.support.consumers:Recorder")
    assert code == 0, out
    workers = [await start("worker", "tests.support.consumers:Recorder", env=env) for _ in range(2)]
    port = free_port()
    ingress = await ingress_up(queue, tmp_path, port)
    url = f"http://127.0.0.1:{port}/b24/events"
    ids = [i for batch in await asyncio.gather(*(post(url, 50) for _ in range(4))) for i in batch]
    await wait_until(lambda: set(lines(record, "done")) == set(ids), 60, "all 200 handled")
    for proc in (*workers, ingress):
        assert await stop(proc) == 0
    starts = lines(record, "start")
    assert len(starts) == len(ids) == len(set(starts)), "a message was handled twice"


async def test_killed_worker_connections_lose_nothing(queue: Settings, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    env = env_for(queue, record, B24QT_SLEEP_S="0.02", B24QT_PREFETCH="8")
    code, out = await cli(queue, "topology", "tests.support.consumers:Recorder")
    assert code == 0, out
    logs = {"worker": tmp_path / "worker.log", "ingress": tmp_path / "ingress.log"}
    worker = await start("worker", "tests.support.consumers:Recorder", env=env, log=logs["worker"])
    port = free_port()
    ingress = await ingress_up(queue, tmp_path, port)
    url = f"http://127.0.0.1:{port}/b24/events"
    admin = aioredis.Redis.from_url(queue.broker_url)
    try:
        first = await post(url, 40)
        await wait_until(lambda: len(lines(record, "start")) > 5, 30, "the worker handling")
        killed = 0
        for client in await admin.client_list():
            if str(client.get("name", "")).startswith("b24queue_worker"):
                await admin.client_kill_filter(_id=client["id"])
                killed += 1
        assert killed >= 1
        second = await post(url, 40)
        ids = set(first + second)
        await wait_until(lambda: ids <= set(lines(record, "done")), 60, "every event handled")
    finally:
        await admin.aclose()
    for proc, log in ((worker, logs["worker"]), (ingress, logs["ingress"])):
        assert await stop(proc, log) == 0


async def test_what_the_persistence_check_refuses_and_what_the_opt_out_allows() -> None:
    from b24queue.errors import ConfigError
    from b24queue.transports.redis_streams.connection import check_durable

    for extra, refused in (
        (("--maxmemory-policy", "allkeys-lru"), "maxmemory-policy allkeys-lru"),
        (("--rename-command", "CONFIG", ""), "cannot read Redis's persistence settings"),
    ):
        with redis_server(extra=extra) as server:
            client = aioredis.Redis.from_url(server.url)
            try:
                settings = load_settings(broker_url=server.url)
                with pytest.raises(ConfigError, match=refused):
                    await check_durable(client, settings)
                unsafe = settings.model_copy(update={"redis_allow_unsafe": True})
                await check_durable(client, unsafe)  # runs, with an error in the log
            finally:
                await client.aclose()


async def test_released_and_abandoned_entries_are_claimed_again(queue: Settings) -> None:
    """A stopping worker's release makes its entries claimable at once; an entry abandoned
    behind many held ones is found (XAUTOCLAIM goes on from where it stopped)."""
    from b24queue import EventConsumer
    from b24queue.events.envelope import envelope_for
    from b24queue.queues import spec_for
    from b24queue.testing import make_event
    from b24queue.transports.redis_streams.connection import connect
    from b24queue.transports.redis_streams.store import Store

    async def handle(self: EventConsumer, event: object) -> None:
        return None

    everything = type("C", (EventConsumer,), {"queue": "rel.q", "events": ("#",), "handle": handle})
    store = Store(connect(queue, "test"), queue)
    try:
        spec = spec_for(everything)
        await store.declare(spec)
        events = [envelope_for(make_event("ONCRMDEALADD", {"N": str(i)})) for i in range(32)]
        await store.publish(events)
        [gone] = await store.claim(spec.name, "B", 1, 60.0)
        await store.release(spec.name, "B")
        [again] = await store.claim(spec.name, "C", 1, 60.0)
        assert (again.id, again.deliveries) == (gone.id, 2)
        held = await store.claim(spec.name, "A", 30, 60.0)  # alive, holding 30
        [dead] = await store.claim(spec.name, "D", 1, 60.0)  # the last one: D then dies
        assert dead.id not in {r.id for r in held}
        await store.release(spec.name, "D")  # as if its lease had run out long ago
        found = []
        for _ in range(8):  # one slot free at a time, as a busy runner claims
            found += await store.claim(spec.name, "E", 1, 60.0)
            if found:
                break
        assert [r.id for r in found] == [dead.id]
    finally:
        await store.client.aclose()


async def test_fair_claims_drain_a_queue_left_by_first_in_first_out_workers(
    queue: Settings,
) -> None:
    """A queue made and partly claimed before fair claims: its waiting entries are parked by the
    first fair claim and given in turns, the entries a first-in-first-out worker held are taken
    over once it is gone (flagged), nothing is lost or given twice, and `status` counts what
    is parked as ready."""
    from b24queue import EventConsumer
    from b24queue.events.envelope import envelope_for
    from b24queue.queues import spec_for
    from b24queue.testing import make_event
    from b24queue.transports.redis_streams.connection import connect
    from b24queue.transports.redis_streams.store import Store

    async def handle(self: EventConsumer, event: object) -> None:
        return None

    attrs = {"queue": "up.q", "events": ("#",), "handle": handle, "max_in_flight_per_portal": 2}
    fair = spec_for(type("F", (EventConsumer,), attrs))
    flood, quiet = "f" * 32, "q" * 32
    store = Store(connect(queue, "test"), queue)
    try:
        await store.declare(fair)
        events = [envelope_for(make_event("ONCRMDEALADD", member_id=flood)) for _ in range(20)]
        events += [envelope_for(make_event("ONCRMDEALADD", member_id=quiet)) for _ in range(3)]
        await store.publish(events)
        old = await store.claim(fair.name, "old", 4, 60.0)  # first in, first out: all flood
        await store.release(fair.name, "old")  # and its lease ran out long ago
        given: list[tuple[str, int, str]] = []
        first = await store.claim(fair.name, "new", 4, 60.0, fair.fairness)
        # The four taken over are parked again at the head of the flood's list: they take turns
        # with the quiet portal and count against the cap (2), flagged redelivered.
        portals = [r.headers.get("x-b24-member-id") for r in first]
        assert portals == [flood, quiet, flood, quiet], portals
        assert [(r.id, r.deliveries) for r in first[::2]] == [(r.id, 2) for r in old[:2]]
        view = await store.overview(60.0)
        assert view.queues[fair.name].ready == 19 and view.queues[fair.name].leased == 4
        assert await store.ack(fair.name, [(r, "new") for r in first]) == [True] * 4
        while rows := await store.claim(fair.name, "new", 3, 60.0, fair.fairness):
            portals = [r.headers.get("x-b24-member-id") for r in rows]
            assert portals.count(flood) <= 2, portals  # the cap
            given += [(r.id, r.deliveries, str(portals[i])) for i, r in enumerate(rows)]
            assert await store.ack(fair.name, [(r, "new") for r in rows]) == [True] * len(rows)
        ids = [r.id for r in first] + [i for i, _, _ in given]
        assert len(ids) == len(set(ids)) == 23
        # The other two taken over come first of the flood's, then what was never claimed.
        floods = [(i, d) for i, d, p in given if p == flood]
        assert floods[:2] == [(old[2].id, 2), (old[3].id, 2)], floods
        assert {d for _, d in floods[2:]} == {1}
        assert [p for _, _, p in given[:3]].count(quiet) == 1, given[:3]
        assert await store.count(fair.name) == 0
    finally:
        await store.client.aclose()


async def test_a_fair_claims_entries_are_released_and_taken_over(queue: Settings) -> None:
    from b24queue import EventConsumer
    from b24queue.events.envelope import envelope_for
    from b24queue.queues import spec_for
    from b24queue.testing import make_event
    from b24queue.transports.redis_streams.connection import connect
    from b24queue.transports.redis_streams.store import Store

    async def handle(self: EventConsumer, event: object) -> None:
        return None

    attrs = {"queue": "fr.q", "events": ("#",), "handle": handle}
    spec = spec_for(type("F", (EventConsumer,), attrs))
    store = Store(connect(queue, "test"), queue)
    try:
        await store.declare(spec)
        await store.publish([envelope_for(make_event("ONCRMDEALADD")) for _ in range(5)])
        [gone] = await store.claim(spec.name, "B", 1, 60.0, spec.fairness)
        assert gone.deliveries == 1
        await store.release(spec.name, "B")
        [again] = await store.claim(spec.name, "C", 1, 60.0, spec.fairness)
        assert (again.id, again.deliveries) == (gone.id, 2)
        # A retry goes back in turn, and is given again once due.
        assert await store.move(again, "C", queue=spec.name, headers={}, delay_s=0)
        rest = await store.claim(spec.name, "C", 10, 60.0, spec.fairness)
        assert len(rest) == 5 and len({r.message_id for r in rest}) == 5
    finally:
        await store.client.aclose()


@pytest.mark.fault
async def test_a_worker_sigkilled_mid_flood_loses_nothing_of_a_fair_queue(
    bench: Bench, tmp_path: Path
) -> None:
    """Two worker processes on a fair queue, a flood parked and quiet portals' events waiting;
    one is SIGKILLed mid-handler: the other takes over what it held once its lease has run
    (flagged redelivered), and every event is handled."""
    from tests.conformance.fairness import FLOOD, QUIET, declare_for_workers, envelope, publish
    from tests.conformance.processes import records, start_worker

    record = tmp_path / "record.txt"
    await declare_for_workers(bench)
    events = envelope(FLOOD, 300) + envelope(QUIET[0], 10) + envelope(QUIET[1], 10)
    await publish(bench, events)
    want = {e.message_id for e in events}
    workers = [await start_worker(bench, record, 0.05) for _ in range(2)]
    try:
        await wait_until(lambda: len(records(record, "done")) >= 40, 30, "the flood under way")
        workers[0].kill()
        await workers[0].wait()
        # Within the lease (B24QT_HANDLE_TIMEOUT_S 3 s + 5 s).
        await wait_until(lambda: want <= set(records(record, "done")), 60, "every event")
        # What came twice (the killed worker's, and any it finished but had not acked yet)
        # came flagged the second time.
        starts = Counter(line.split()[1] for line in record.read_text().splitlines())
        twice = {i for i, n in starts.items() if n > 2}  # a start and a done line each time
        assert all(records(record, "start")[i] == "1" for i in twice), twice
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
                await asyncio.wait_for(worker.wait(), 30)
