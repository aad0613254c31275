"""A consumer whose `events` shrink stops getting what it dropped: its stale bindings are removed
at worker start and by `b24queue topology` (shown first by `--dry-run`), one log line each;
queues no running code declares keep theirs."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from b24queue import Event, EventConsumer
from b24queue.worker import Worker
from tests.support.rabbitmq import Broker, run_cli, running_ingress
from tests.support.samples import sample_form
from tests.support.wait import wait_until

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
pytestmark = pytest.mark.broker


def consumer(
    queue: str, events: tuple[str, ...], seen: list[str], fair: bool = False
) -> type[EventConsumer]:
    """A queue bound itself (`fair`: its fair exchange is, tests/transports/amqp/test_fair.py)."""

    async def handle(self: EventConsumer, event: Event) -> None:
        seen.append(event.name)

    body: dict[str, Any] = {
        "queue": queue,
        "events": events,
        "handle": handle,
        "fair_share": fair,
    }
    return type("Deals", (EventConsumer,), body)


async def bound_keys(broker: Broker, queue: str) -> set[str]:
    rows = await broker.mgmt.get(f"/api/bindings/%2F/e/{broker.settings.exchange}/q/{queue}")
    return {r["routing_key"] for r in rows}


async def post(broker: Broker, *names: str) -> None:
    async with running_ingress(broker.settings) as (client, _):
        for name in names:
            resp = await client.post("/b24/events", data=sample_form(name), headers=FORM)
            assert resp.status == 200


async def test_a_worker_restarted_with_fewer_events_stops_getting_the_dropped_ones(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    queue = broker.name("deals")
    other = await broker.bind_queue("someone-else", "ONCRMDEALUPDATE")  # not our code's queue
    seen: list[str] = []
    async with Worker(
        broker.settings, [consumer(queue, ("ONCRMDEALADD", "ONCRMDEALUPDATE"), seen)]
    ):
        assert await bound_keys(broker, queue) == {"ONCRMDEALADD", "ONCRMDEALUPDATE"}
    with caplog.at_level(logging.INFO, logger="b24queue.transports.amqp.bindings"):
        async with Worker(broker.settings, [consumer(queue, ("ONCRMDEALADD",), seen)]):
            assert await bound_keys(broker, queue) == {"ONCRMDEALADD"}
            await post(broker, "crm-deal-update", "crm-deal-add")
            await wait_until(lambda: "ONCRMDEALADD" in seen, what="the add handled")
    assert "ONCRMDEALUPDATE" not in seen
    removed = [r.getMessage() for r in caplog.records if "removed binding" in r.getMessage()]
    assert removed == [
        f"queue {queue}: removed binding ONCRMDEALUPDATE from {broker.settings.exchange} "
        "(no longer in its consumer's events)"
    ]
    assert await bound_keys(broker, other) == {"ONCRMDEALUPDATE"}
    assert await broker.depth(other) == 1  # the update went to the queue still bound to it


async def test_topology_dry_run_shows_the_change_and_topology_applies_it(broker: Broker) -> None:
    queue = broker.name("narrow")
    spec = "tests.support.consumers:Narrowing"
    env = {"B24QT_QUEUE": queue, "B24QT_EVENTS": "ONCRMDEALADD,CATALOG.#", "B24QT_FAIR": "0"}
    code, out = await run_cli(broker, "topology", "--dry-run", spec, **env)
    assert code == 0, out
    assert f"queue {queue} (would be created)" in out and "+ bind CATALOG.#" in out
    code, out = await run_cli(broker, "topology", spec, **env)
    assert code == 0, out
    assert await bound_keys(broker, queue) == {"ONCRMDEALADD", "CATALOG.#"}

    env["B24QT_EVENTS"] = "ONCRMDEALADD"
    code, out = await run_cli(broker, "topology", "--dry-run", "--json", spec, **env)
    assert code == 0, out
    plan = json.loads(out[out.index("[") :])
    assert plan == [
        {"queue": queue, "kind": "queue", "exists": True, "add": [], "remove": ["CATALOG.#"]}
    ]
    assert await bound_keys(broker, queue) == {"ONCRMDEALADD", "CATALOG.#"}  # dry: unchanged

    code, out = await run_cli(broker, "topology", spec, **env)
    assert code == 0, out
    assert "removed binding CATALOG.#" in out
    assert await bound_keys(broker, queue) == {"ONCRMDEALADD"}
    code, out = await run_cli(broker, "topology", "--dry-run", spec, **env)
    assert "bindings up to date" in out


Checker = Callable[[], Awaitable[bool]]
