"""The portal's leaky bucket on our side: the arithmetic, and the shared state in SQLite (two
connections, as two processes have) and Redis (the machine's, a unique prefix per test)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from b24queue.errors import ConfigError
from b24queue.portal.limits import HEADROOM, MAX_HELD_METHODS, Limit, reserve
from b24queue.portal.redis_state import RedisState
from b24queue.portal.sqlite_state import SqliteState
from b24queue.portal.state import SharedState, open_state
from tests.support.wait import wait_until


def test_reservations_go_at_once_up_to_the_capacity_then_wait_their_turn() -> None:
    limit = Limit(burst=50, drain_per_s=2.0, max_wait_s=10.0)
    assert limit.capacity == 50 - HEADROOM
    assert Limit(250, 5.0, 10.0).capacity == 247.5  # Enterprise: half a second is 2.5 requests
    assert Limit(20, 20.0, 10.0).capacity == 10  # a fast drain: more held back
    level, waits = 0.0, []
    for _ in range(60):
        done = reserve(level, 100.0, 100.0, limit)
        assert done is not None
        level, wait = done
        waits.append(wait)
    assert waits[:48] == [0.0] * 48
    assert waits[48:52] == [0.5, 1.0, 1.5, 2.0]  # one more every 1/drain seconds
    assert reserve(level, 100.0, 100.0, limit) == (61.0, 6.5)
    assert reserve(68.0, 100.0, 100.0, limit) is None  # 10.5 s: over the wait, not reserved
    assert reserve(48.0, 100.0, 110.0, limit) == (29.0, 0.0)  # drained 20 in 10 s
    assert reserve(5.0, 100.0, 90.0, limit) == (6.0, 0.0)  # a clock gone back drains nothing


def test_enterprise_preset_and_overrides() -> None:
    from b24queue.settings import load_settings

    assert load_settings().portal_limits == (50, 2.0)
    assert load_settings(portal_plan="enterprise").portal_limits == (250, 5.0)
    assert load_settings(portal_plan="enterprise", portal_burst=100).portal_limits == (100, 5.0)
    with pytest.raises(ConfigError):
        open_state("postgres://x")


@pytest.fixture(params=["sqlite", "redis"])
async def states(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[SharedState, SharedState]]:
    """Two handles on one shared state, as two worker processes have."""
    if request.param == "sqlite":
        a: SharedState = SqliteState(tmp_path / "portals.db")
        b: SharedState = SqliteState(tmp_path / "portals.db")
    else:
        prefix = f"b24q-test-{uuid.uuid4().hex}:"
        a, b = (RedisState("redis://127.0.0.1:6379/0", prefix) for _ in range(2))
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_two_processes_share_one_bucket_per_portal(
    states: tuple[SharedState, SharedState],
) -> None:
    a, b = states
    limit = Limit(burst=6, drain_per_s=0.01, max_wait_s=250.0)  # capacity 4; drains ~nothing
    waits = [await s.reserve("m1", limit) for s in (a, b, a, b, a, b)]
    assert waits[:4] == [0.0, 0.0, 0.0, 0.0]
    assert waits[4] == pytest.approx(100, abs=1) and waits[5] == pytest.approx(200, abs=1)
    assert await a.reserve("m1", limit) is None  # 300 s away: over the wait
    assert await b.reserve("m2", limit) == 0.0  # another portal, another bucket


async def test_one_refresh_lease_per_portal(states: tuple[SharedState, SharedState]) -> None:
    a, b = states
    assert await a.lease("m1", "proc-a", 30)
    assert not await b.lease("m1", "proc-b", 30)
    assert await b.lease("m2", "proc-b", 30)
    await b.release("m1", "proc-b")  # not its lease: nothing happens
    assert not await b.lease("m1", "proc-b", 30)
    await a.release("m1", "proc-a")
    assert await b.lease("m1", "proc-b", 0.05)
    assert not await a.lease("m1", "proc-a", 30)
    # A holder that died: its lease runs out and another takes it.
    await wait_until(lambda: a.lease("m1", "proc-a", 30), 5, "the dead holder's lease to end")
    assert not await b.lease("m1", "proc-b", 30)
    # A live holder renews its own lease, and only its own.
    assert await a.renew("m1", "proc-a", 2) and not await b.renew("m1", "proc-b", 30)
    assert not await b.lease("m1", "proc-b", 30)
    assert await b.lease("m2x", "proc-b", 0.05)
    await wait_until(lambda: a.lease("m2x", "proc-a", 30), 5, "b's short lease to end")
    assert not await b.renew("m2x", "proc-b", 30)  # ran out and taken: not b's to renew


async def test_held_methods_are_shared_per_portal_and_bounded(
    states: tuple[SharedState, SharedState],
) -> None:
    a, b = states
    assert await b.held("m1", "crm.deal.get") == 0.0
    await a.hold("m1", "crm.deal.get", 30)
    assert 29 < await b.held("m1", "CRM.Deal.Get") <= 30  # the other process sees it
    assert await b.held("m1", "crm.deal.list") == 0.0  # another method: free
    assert await b.held("m2", "crm.deal.get") == 0.0  # another portal: free
    await b.hold("m1", "crm.deal.get", 5)  # a shorter hold does not shorten the longer one
    assert await a.held("m1", "crm.deal.get") > 29
    await a.hold("m1", "crm.deal.add", 0.05)
    await wait_until(lambda: _free(b, "m1", "crm.deal.add"), 5, "a short hold to end")
    # The app's method names per portal are bounded: past the most, the soonest free goes.
    for i in range(MAX_HELD_METHODS + 10):
        await a.hold("m1", f"crm.item{i}.list", 100 + i)
    assert await b.held("m1", "crm.deal.get") == 0.0  # ends first (30 s): dropped
    held = [await b.held("m1", f"crm.item{i}.list") for i in range(MAX_HELD_METHODS + 10)]
    assert sum(1 for h in held if h > 0) == MAX_HELD_METHODS
    assert held[-1] > 0 and held[0] == 0.0


async def _free(state: SharedState, key: str, method: str) -> bool:
    return await state.held(key, method) == 0.0
