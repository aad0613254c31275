"""The offline service's loop per portal against scripted portals (no broker, no HTTP): a backoff
is waited whatever its value, the broker's grows, a wake-up counts only with the portal's own
token, and only our own credentials lookup ends a portal's loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from b24queue.auth.record import PortalRecord
from b24queue.errors import BrokerUnavailableError
from b24queue.events.envelope import token_digest
from b24queue.events.event import Event, mark_delivered
from b24queue.offline import service as service_module
from b24queue.offline.service import OfflineService, wake_consumer
from b24queue.portal.api import NoCredentials, PortalError, PortalRetry
from b24queue.settings import load_settings
from b24queue.telemetry.metrics import OfflineMetrics
from tests.support.offline_stubs import ScriptedPortal, State, Store, one_record_batch
from tests.support.samples import SAMPLE_TOKEN
from tests.support.sinks import MemorySink

MEMBER = "msvc0ff"
RECORD = PortalRecord(member_id=MEMBER, domain="svc.example", token="app-token-msvc0ff")


@contextlib.asynccontextmanager
async def running(
    portal: ScriptedPortal, sink: MemorySink | None = None, quiet_s: float = 2.0, **values: Any
) -> AsyncIterator[OfflineService]:
    settings = load_settings(app_tokens=SAMPLE_TOKEN, shutdown_timeout_s=2, **values)
    service = OfflineService(
        settings,
        lambda event: portal,
        sink or MemorySink(),
        Store(RECORD),  # type: ignore[arg-type]
        State(),  # type: ignore[arg-type]
        OfflineMetrics(),
        quiet_s=quiet_s,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("batch", "delay_s"),
    [(1, 1.0), (20, 20.0)],  # a backoff of as many seconds as the batch has records
)
async def test_a_backoff_equal_to_the_batch_size_is_still_waited(
    batch: int, delay_s: float
) -> None:
    def get(params: dict[str, Any]) -> Any:
        raise PortalRetry("OPERATION_TIME_LIMIT", "", delay_s)

    portal = ScriptedPortal(get)
    async with running(portal, offline_batch=batch, offline_poll_s=3600):
        await until(lambda: len(portal.times()) >= 1)
        await asyncio.sleep(0.5)  # what a hot loop would fill with gets
    assert len(portal.times()) == 1


async def test_the_broker_away_backs_off_longer_each_time_and_resets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_module, "BROKER_WAIT_S", 0.05)
    monkeypatch.setattr(service_module, "BROKER_MAX_WAIT_S", 0.2)
    sink = MemorySink()
    sink.fail = BrokerUnavailableError("away")
    portal = ScriptedPortal(one_record_batch)
    async with running(portal, sink, offline_poll_s=3600) as service:
        await until(lambda: len(portal.times()) >= 5)
        times = portal.times()
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2 and gaps[3] < 1.0  # capped
        assert portal.calls[-1][2]["process_id"] == "p1"  # the same batch, asked for again
        sink.fail = None
        await until(lambda: len(sink.published) == 1)
        await until(lambda: not service._broker_wait_s)  # reset by the success


async def test_a_wake_counts_only_with_the_portals_own_token() -> None:
    portal = ScriptedPortal(lambda params: {"events": []})
    async with running(portal, offline_poll_s=3600, quiet_s=0.2) as service:
        await until(lambda: len(portal.times()) == 1)
        consumer = wake_consumer(service._s, service)

        async def ping(token: str) -> None:
            event = Event.from_payload({"event": "ONOFFLINEEVENT", "auth": {"member_id": MEMBER}})
            mark_delivered(event, "m", 1, False, token_digest=token_digest(token))
            await consumer.handle(None, event)  # type: ignore[arg-type]

        await ping(SAMPLE_TOKEN)  # the ingress lets a static token in with any member_id
        await asyncio.sleep(0.4)  # past the quiet time after the first pull
        assert len(portal.times()) == 1
        await ping(RECORD.token)
        await until(lambda: len(portal.times()) == 2, 2.0)
        assert not service.wake("someone-else", token_digest(RECORD.token))


async def test_a_failed_pull_is_tried_again_soon_not_after_the_poll_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_module, "FAIL_WAIT_S", 0.1)
    monkeypatch.setattr(service_module, "FAIL_MAX_WAIT_S", 0.4)
    fails = iter(range(4))

    def get(params: dict[str, Any]) -> Any:
        if next(fails, None) is not None:
            raise PortalError("HTTP_502", "a blip")
        return {"events": []}

    portal = ScriptedPortal(get)
    async with running(portal, offline_poll_s=3600) as service:
        await until(lambda: len(portal.times()) == 5)
        gaps = [b - a for a, b in itertools.pairwise(portal.times())]
        assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4 and gaps[3] < 1.0  # capped
        await until(lambda: not service._fail_wait_s)  # reset by the pull that went through


async def test_a_recovery_due_never_cuts_a_backoff_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "RECOVER_S", 0.05)

    def get(params: dict[str, Any]) -> Any:
        raise PortalRetry("OPERATION_TIME_LIMIT", "", 3.0)

    portal = ScriptedPortal(get)
    async with running(portal, offline_poll_s=3600):
        await until(lambda: len(portal.times()) >= 1)
        await asyncio.sleep(0.6)  # recoveries due every 0.05 s meanwhile
        assert len(portal.times()) == 1


async def test_a_recovery_with_nothing_to_publish_keeps_the_broker_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_module, "RECOVER_S", 0.0)  # a recovery before every pull
    monkeypatch.setattr(service_module, "BROKER_WAIT_S", 0.05)
    sink = MemorySink()
    sink.fail = BrokerUnavailableError("away")
    portal = ScriptedPortal(one_record_batch)
    async with running(portal, sink, offline_poll_s=3600):
        await until(lambda: len(portal.times()) >= 4)
        gaps = [b - a for a, b in itertools.pairwise(portal.times())]
        assert gaps[1] >= 0.1 and gaps[2] >= 0.2  # still growing


@pytest.mark.parametrize("code", ["WRONG_PORTAL", "NO_CREDENTIALS"])
async def test_a_portal_answering_our_own_codes_is_not_gone(code: str) -> None:
    def get(params: dict[str, Any]) -> Any:
        raise PortalError(code, "said by the portal")

    portal = ScriptedPortal(get)
    async with running(portal, offline_poll_s=0.05) as service:
        await until(lambda: len(portal.times()) >= 3)  # still pulled, at the poll interval
        assert not service._tasks[MEMBER].done()


async def test_no_credentials_of_our_own_ends_the_portals_loop() -> None:
    def get(params: dict[str, Any]) -> Any:
        raise NoCredentials("NO_CREDENTIALS", "not installed")

    portal = ScriptedPortal(get)
    async with running(portal, offline_poll_s=0.05) as service:
        await until(lambda: MEMBER in service._tasks and service._tasks[MEMBER].done())
    assert len(portal.times()) == 1
