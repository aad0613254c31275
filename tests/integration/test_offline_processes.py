"""Faults of real puller processes (tests/support/offline_puller.py: the product's
`serve_offline` with the fake portal's resolver) on the real RabbitMQ: SIGKILL between publish and
clear, and between get and publish; two pullers on one portal. No record is lost; the only
duplicates are a killed puller's batch, published again with the same message ids."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from b24queue import Event, EventConsumer
from b24queue.auth.store import open_store
from b24queue.idempotency import MemorySeenStore
from b24queue.worker import Worker
from tests.support.fake_offline import FakeOffline
from tests.support.fake_portal import FakePortal
from tests.support.offline_setup import bodies, installed, offline_env
from tests.support.portal_setup import domain_of
from tests.support.processes import ROOT, STARTED, start, stop
from tests.support.proxy import Proxy
from tests.support.rabbitmq import AMQP_URL, Broker
from tests.support.wait import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MEMBER = "mkill0ff"
REDIS = "redis://127.0.0.1:6379/0"
HOST = domain_of(MEMBER)


@pytest.fixture
def offline(fake_portal: FakePortal) -> FakeOffline:
    return FakeOffline.attach(fake_portal.rest)


async def puller(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    proc = await start_puller(env, log)
    await wait_until(lambda: log.exists() and "offline puller running" in log.read_text(), 60)
    return proc


async def start_puller(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.offline_puller", cwd=ROOT, env=env,
            stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    STARTED.append(proc)
    return proc


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


def env_of(
    broker: Broker, fake_portal: FakePortal, cert: Any, tmp_path: Path, **extra: Any
) -> dict[str, str]:
    store = extra.pop("portal_store", f"sqlite:{tmp_path / 'portals.db'}")
    return offline_env(broker, store, cert[0], fake_portal.listen_port, offline_lease_s=2, **extra)


@pytest.mark.parametrize("where", ["between publish and clear", "between get and publish"])
async def test_a_puller_killed_mid_batch_loses_nothing(
    where: str, broker: Broker, fake_portal: FakePortal, offline: FakeOffline,
    portal_certificate: Any, tmp_path: Path,
) -> None:  # fmt: skip
    await installed(f"sqlite:{tmp_path / 'portals.db'}", fake_portal.rest, offline, MEMBER)
    for deal in range(1, 41):
        await offline.change(HOST, "ONCRMDEALUPDATE", deal)
    await broker.bind_queue("seen", "ONCRMDEALUPDATE")
    handled: list[str] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        handled.append(event.data["FIELDS"]["ID"])

    guarded = type(
        "Guarded",
        (EventConsumer,),
        {
            "queue": broker.name("guarded"),
            "events": ("ONCRMDEALUPDATE",),
            "idempotency": MemorySeenStore(),
            "handle": handle,
        },
    )
    async with Worker(broker.settings, [guarded]):
        await _killed_mid_batch(where, broker, fake_portal, offline, portal_certificate, tmp_path)
        queue = broker.name("guarded")

        async def drained() -> bool:
            return len(handled) >= 40 and await broker.depth(queue) == 0

        await wait_until(drained, 30, "the guarded consumer's queue drained")
    # With the duplicate guard, each record is handled once; the repeats were dropped.
    assert sorted(int(i) for i in handled) == list(range(1, 41))


async def _killed_mid_batch(
    where: str, broker: Broker, fake_portal: FakePortal, offline: FakeOffline,
    portal_certificate: Any, tmp_path: Path,
) -> None:  # fmt: skip
    seen = broker.name("seen")
    method = "event.offline.clear" if where == "between publish and clear" else "event.offline.get"
    offline.hold[method] = asyncio.Event()
    offline.arrived[method] = asyncio.Event()
    env = env_of(broker, fake_portal, portal_certificate, tmp_path, offline_batch=40)
    first = await start_puller(env, tmp_path / "puller1.log")
    await asyncio.wait_for(offline.arrived[method].wait(), 60)
    if method == "event.offline.clear":
        # Every record is durable before the clear is even asked for.
        assert await broker.depth(seen) == 40
    else:
        assert await broker.depth(seen) == 0  # reserved on the portal, published nowhere yet
    await kill(first)
    offline.drop(method)  # the held request dies with its process
    assert not offline.cleared and len(offline.waiting(HOST)) == 40
    assert all(r.process_id for r in offline.waiting(HOST))  # reserved, under a lost id

    second = await puller(env, tmp_path / "puller2.log")
    await wait_until(lambda: len(offline.cleared) == 40, 60, "the batch redone and cleared")
    await stop(second)
    expected = 80 if method == "event.offline.clear" else 40
    messages = await broker.take(seen, expected)
    assert await broker.depth(seen) == 0
    ids = Counter(m.message_id for m in messages)
    assert sorted(int(b["data"]["FIELDS"]["ID"]) for b in bodies(messages)[:]) == sorted(
        [d for d in range(1, 41) for _ in range(expected // 40)]
    )
    # The duplicates are the same messages (same message_id): the duplicate guard drops them.
    assert len(ids) == 40 and set(ids.values()) == {expected // 40}
    assert sorted(int(o) for _, _, o in offline.cleared) == list(range(1, 41))  # once each


@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
async def test_two_pullers_on_one_portal_share_it_without_loss(
    store_kind: str, broker: Broker, fake_portal: FakePortal, offline: FakeOffline,
    portal_certificate: Any, tmp_path: Path,
) -> None:  # fmt: skip
    # On Redis (the store pullers on several hosts share) the portal is this test's own.
    member = MEMBER if store_kind == "sqlite" else f"m{uuid.uuid4().hex[:12]}"
    spec = f"sqlite:{tmp_path / 'portals.db'}" if store_kind == "sqlite" else REDIS
    await installed(spec, fake_portal.rest, offline, member)
    try:
        await _two_pullers(spec, member, broker, fake_portal, offline, portal_certificate, tmp_path)
    finally:
        store = open_store(spec)
        await store.forget(member)
        await store.close()


async def _two_pullers(
    spec: str, member: str, broker: Broker, fake_portal: FakePortal, offline: FakeOffline,
    portal_certificate: Any, tmp_path: Path,
) -> None:  # fmt: skip
    host = domain_of(member)
    seen = await broker.bind_queue("seen", "ONCRMDEALUPDATE")
    env = env_of(
        broker, fake_portal, portal_certificate, tmp_path, offline_batch=25, portal_store=spec,
        offline_portals=member,
    )  # fmt: skip
    procs = [await puller(env, tmp_path / f"puller{i}.log") for i in (1, 2)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    changes = 0
    for deal in range(1, 601):  # while both pull, in bursts; some objects change again
        await offline.change(host, "ONCRMDEALUPDATE", deal)
        changes += 1
        if deal % 50 == 0:
            for again in range(deal - 49, deal - 39):
                await offline.change(host, "ONCRMDEALUPDATE", again)
                changes += 1
            await asyncio.sleep(0)  # the fake portal answers between bursts
    await wait_until(lambda: not offline.waiting(host), 90, "the queue drained")
    elapsed = loop.time() - started
    for proc in procs:
        assert await stop(proc) == 0
    published = [_published(tmp_path / f"puller{i}.log") for i in (1, 2)]
    total = sum(published)
    messages = await broker.take(seen, total)
    assert await broker.depth(seen) == 0  # what the pullers say they published, no more
    assert all(n > 0 for n in published), published  # both pulled
    got = Counter(int(b["data"]["FIELDS"]["ID"]) for b in bodies(messages))
    assert set(got) == set(range(1, 601))  # every object's change arrived
    assert {int(o) for _, _, o in offline.cleared} == set(range(1, 601))
    # No record handled twice: a second message for an object is a later change of it (a new
    # reservation, so a new message_id), never the same record again.
    assert len({m.message_id for m in messages}) == total
    assert total <= changes
    assert fake_portal.rest.over_limit == 0  # both within the portal's one shared bucket
    print(f"\n{total} records by 2 pullers in {elapsed:.1f}s: {total / elapsed:.0f}/s")


def _published(log: Path) -> int:
    line = next(ln for ln in log.read_text().splitlines() if "offline puller stopped" in ln)
    totals = json.loads(line.split("stopped: ", 1)[1].replace("'", '"'))
    return int(totals["published"])


async def test_the_offline_command_starts_and_stops_gracefully(
    broker: Broker, fake_portal: FakePortal, portal_certificate: Any, tmp_path: Path
) -> None:
    env = env_of(broker, fake_portal, portal_certificate, tmp_path)
    env.pop("B24QT_PORTAL_PORT")
    log = tmp_path / "offline.log"
    proc = await start("offline", env=env, log=log)
    await wait_until(lambda: log.exists() and "offline puller running" in log.read_text(), 60)
    assert await stop(proc) == 0
    assert "offline puller stopped" in log.read_text()


async def test_sigterm_mid_batch_finishes_and_clears_it(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    await installed(f"sqlite:{tmp_path / 'portals.db'}", fake_portal.rest, offline, MEMBER)
    for deal in range(1, 31):
        await offline.change(HOST, "ONCRMDEALUPDATE", deal)
    seen = await broker.bind_queue("seen", "ONCRMDEALUPDATE")
    offline.hold["event.offline.clear"] = asyncio.Event()
    offline.arrived["event.offline.clear"] = asyncio.Event()
    env = env_of(broker, fake_portal, portal_certificate, tmp_path, offline_batch=30)
    proc = await start_puller(env, tmp_path / "puller.log")
    await asyncio.wait_for(offline.arrived["event.offline.clear"].wait(), 60)
    proc.send_signal(signal.SIGTERM)  # while its clear is under way
    await wait_until(lambda: "shutting down" in (tmp_path / "puller.log").read_text(), 20)
    offline.hold["event.offline.clear"].set()  # the portal answers after all
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert len(offline.cleared) == 30 and not offline.waiting(HOST)
    assert len(await broker.take(seen, 30)) == 30 and await broker.depth(seen) == 0  # once each


@pytest.mark.long
async def test_a_puller_process_clears_nothing_while_the_broker_is_unreachable(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    await installed(f"sqlite:{tmp_path / 'portals.db'}", fake_portal.rest, offline, MEMBER)
    seen = await broker.bind_queue("seen", "ONCRMDEALUPDATE")
    proxy = Proxy()
    await proxy.start()
    url = AMQP_URL.replace(":5672/", f":{proxy.port}/")
    env = env_of(broker, fake_portal, portal_certificate, tmp_path, amqp_url=url)
    env["B24QUEUE_PUBLISH_TIMEOUT_S"] = "1"
    log = tmp_path / "puller.log"
    try:
        proc = await puller(env, log)
        await offline.change(HOST, "ONCRMDEALUPDATE", 1)
        await wait_until(lambda: len(offline.cleared) == 1, 30, "the first record cleared")
        await proxy.cut()  # RabbitMQ unreachable for this process only
        for deal in range(2, 41):
            await offline.change(HOST, "ONCRMDEALUPDATE", deal)
        await wait_until(
            lambda: log.read_text().count("wait for the broker") >= 3, 60, "pulls failing"
        )
        assert len(offline.cleared) == 1 and all(r.process_id for r in offline.waiting(HOST))
        await proxy.start()  # back
        await wait_until(lambda: len(offline.cleared) == 40, 60, "every record cleared")
        assert await stop(proc) == 0
    finally:
        await proxy.cut()
    messages = await broker.take(seen, 40)
    assert {b["data"]["FIELDS"]["ID"] for b in bodies(messages)} == {str(i) for i in range(1, 41)}
    assert await broker.depth(seen) == 0
