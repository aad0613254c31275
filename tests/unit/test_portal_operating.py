"""Bitrix24's run-time limit per method (429 OPERATION_TIME_LIMIT with `time.operating_reset_at`):
the portal's value bounded, and the hold it puts on that method of that portal, shared by two
clients on one store (as two worker processes are) against the fake portal over HTTPS."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest

from b24queue.auth.sqlite_store import SqliteTokenStore
from b24queue.portal.api import PortalRetry
from b24queue.portal.clients import PortalClients
from b24queue.portal.limits import (
    OPERATING_DEFAULT_S,
    OPERATING_MARGIN_S,
    OPERATING_MIN_S,
    OPERATING_WINDOW_S,
    operating_hold_s,
)
from b24queue.portal.sqlite_state import SqliteState
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.portal_setup import deal_event, install, portal_settings


def test_the_portals_reset_time_is_bounded() -> None:
    now = 1_000_000.0

    def hold(reset: object) -> float:
        return operating_hold_s(
            {"error": "OPERATION_TIME_LIMIT", "time": {"operating_reset_at": reset}}, now
        )

    assert hold(now + 3) == 3.0 + OPERATING_MARGIN_S
    assert hold("1000007") == 7.0 + OPERATING_MARGIN_S  # digits in a string, as PHP may write them
    assert hold(now - 50) == OPERATING_MIN_S  # in the past (or our clock is ahead)
    assert hold(now + 10**9) == OPERATING_WINDOW_S  # never more than the 10-minute window
    for hostile in (None, True, "soon", "9" * 40, float("nan"), float("inf"), [1], {"a": 1}):
        assert hold(hostile) == OPERATING_DEFAULT_S
    assert operating_hold_s({"time": "x"}, now) == OPERATING_DEFAULT_S
    assert operating_hold_s({}, now) == OPERATING_DEFAULT_S


async def test_a_limited_method_waits_until_the_portal_says_and_other_methods_do_not(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    settings = portal_settings(
        portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}", portal_max_wait_s=20
    )
    store = SqliteTokenStore(tmp_path / "portals.db")
    await install(store, rest, "m1")
    await install(store, rest, "m2")
    seen = SqliteState(tmp_path / "portals.db")
    # Two clients on one store: two worker processes.
    async with (
        PortalClients(settings, resolver=StaticResolver()) as one,
        PortalClients(settings, resolver=StaticResolver()) as two,
    ):
        reset = math.ceil(time.time()) + 3  # Bitrix24 gives whole seconds
        rest.operating_until["m1.portal.test", "crm.deal.get"] = reset
        first = asyncio.create_task(
            one.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
        )
        for _ in range(200):  # until the first call's 429 is held in the store
            if await seen.held("m1", "crm.deal.get") > 0:
                break
            await asyncio.sleep(0.01)
        held = await seen.held("m1", "CRM.DEAL.GET")  # Bitrix24's names ignore case
        assert 0 < held - (reset - time.time()) <= OPERATING_MARGIN_S + 0.05
        assert await seen.held("m2", "crm.deal.get") == 0.0  # another portal: not held
        other = two.for_event(deal_event("m1", 2))
        started = time.monotonic()
        # Another method of that portal goes at once, from the other process.
        assert (await other.call("crm.deal.list", {"start": 0}))[0]["ID"] == "1"
        assert time.monotonic() - started < 0.5
        # So does the same method on another portal (its own run time).
        assert (await two.for_event(deal_event("m2", 3)).call("crm.deal.get", {"id": 3}))[
            "ID"
        ] == "3"
        # The same method of that portal waits until the portal's reset time, and is served.
        started, due_s = time.monotonic(), reset - time.time()
        assert (await other.call("crm.deal.get", {"id": 2}))["ID"] == "2"
        waited, done_at = time.monotonic() - started, time.time()
        assert (await first)["ID"] == "1"
    print(f"\nreset {due_s:.2f}s ahead: the next call of that method waited {waited:.2f}s")
    assert reset <= done_at < reset + 1.0
    assert due_s <= waited < due_s + OPERATING_MARGIN_S + 0.3
    # One 429 only: neither the first call nor the other process hit the portal again before then.
    assert [(h, m) for h, m, _ in rest.time_refused] == [("m1.portal.test", "crm.deal.get")]
    await seen.close()
    await store.close()


async def test_a_hold_longer_than_the_wait_retries_the_event_without_calling(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    settings = portal_settings(
        portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}", portal_max_wait_s=5
    )
    store = SqliteTokenStore(tmp_path / "portals.db")
    await install(store, rest, "m1")
    reset = math.ceil(time.time()) + 60
    rest.operating_until["m1.portal.test", "crm.deal.get"] = reset
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        portal = clients.for_event(deal_event("m1", 1))
        with pytest.raises(PortalRetry) as first:
            await portal.call("crm.deal.get", {"id": 1})
        assert first.value.code == "OPERATION_TIME_LIMIT"
        assert 0 < first.value.delay_s - (reset - time.time()) <= OPERATING_MARGIN_S + 0.1
        started = time.monotonic()
        with pytest.raises(PortalRetry) as again:
            await clients.for_event(deal_event("m1", 2)).call("crm.deal.get", {"id": 2})
        assert time.monotonic() - started < 0.5  # no wait in the handler
        assert again.value.code == "OPERATION_TIME_LIMIT"
        assert 0 < again.value.delay_s - (reset - time.time()) <= OPERATING_MARGIN_S + 0.1
        assert len(rest.time_refused) == 1  # the portal was not called again
        assert (await portal.call("crm.deal.list", {"start": 0}))[0]["ID"] == "1"
        # A hostile reset time a year ahead holds at most the 10-minute window.
        rest.operating_until["m1.portal.test", "crm.deal.list"] = time.time() + 365 * 86400
        with pytest.raises(PortalRetry) as far:
            await portal.call("crm.deal.list", {"start": 0})
        assert OPERATING_WINDOW_S - 1 < far.value.delay_s <= OPERATING_WINDOW_S
    await store.close()
