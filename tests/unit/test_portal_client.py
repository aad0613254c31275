"""The portal client against the fake portal over HTTPS (no broker): calls, batch, paging, the
documented errors, the leaky bucket counted at the fake, token choice and tenants."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from b24queue.auth.store import SqliteTokenStore
from b24queue.events import Event
from b24queue.portal.api import PortalError, PortalRetry
from b24queue.portal.clients import PortalClients
from b24queue.retry import Retry
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.portal_setup import deal_event, install, portal_settings


@pytest.fixture
async def clients(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> AsyncIterator[PortalClients]:
    settings = portal_settings(
        portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}", portal_max_wait_s=30
    )
    async with PortalClients(settings, resolver=StaticResolver()) as c:
        yield c


async def store_of(tmp_path: Path) -> SqliteTokenStore:
    return SqliteTokenStore(tmp_path / "portals.db")


async def test_call_batch_and_list(
    clients: PortalClients, fake_portal: FakePortal, tmp_path: Path
) -> None:
    store = await store_of(tmp_path)
    await install(store, fake_portal.rest, "m1")
    portal = clients.for_event(deal_event("m1", 42))
    assert (await portal.call("crm.deal.get", {"id": 42}))["TITLE"] == "Deal 42"
    commands = {f"d{i}": ("crm.deal.get", {"id": i}) for i in range(1, 121)}
    commands["missing"] = ("crm.deal.get", {"id": 999})
    results = await portal.batch(commands)
    assert results["d120"]["ID"] == "120" and len(results) == 121
    assert isinstance(results["missing"], PortalError) and results["missing"].code == "NOT_FOUND"
    batches = [m for _, m, _ in fake_portal.rest.served if m == "batch"]
    assert len(batches) == 3  # 121 commands: 50 + 50 + 21
    with pytest.raises(PortalError, match="NOT_FOUND"):
        await portal.batch({"missing": ("crm.deal.get", {"id": 999})}, halt=True)
    ids = [deal["ID"] async for deal in portal.list("crm.deal.list", {"select": ["ID"]})]
    assert ids == [str(i) for i in range(1, 121)]  # three pages, by `next`
    assert [d async for d in portal.list("crm.deal.list", max_items=7)][-1]["ID"] == "7"
    # An answer that arrives in pieces is read whole.
    assert len((await portal.call("crm.deal.pieces"))["PAD"]) == 200_000
    await store.close()


async def test_batch_commands_named_by_numbers(
    clients: PortalClients, fake_portal: FakePortal, tmp_path: Path
) -> None:
    store = await store_of(tmp_path)
    await install(store, fake_portal.rest, "m1")
    portal = clients.for_event(deal_event("m1", 1))
    # PHP answers `result` as a JSON array when the names are 0..n-1, `result_error` as [].
    results = await portal.batch({str(i): ("crm.deal.get", {"id": i + 1}) for i in range(3)})
    assert {name: deal["ID"] for name, deal in results.items()} == {"0": "1", "1": "2", "2": "3"}
    mixed = await portal.batch(
        {"0": ("crm.deal.get", {"id": 999}), "1": ("crm.deal.get", {"id": 5})}
    )
    assert isinstance(mixed["0"], PortalError) and mixed["0"].code == "NOT_FOUND"
    assert mixed["1"]["ID"] == "5"
    failed = await portal.batch(
        {"0": ("crm.deal.get", {"id": 998}), "x": ("crm.deal.get", {"id": 999})}
    )
    assert all(isinstance(e, PortalError) for e in failed.values()) and len(failed) == 2
    await store.close()


async def test_errors_are_typed_and_never_show_a_token(
    clients: PortalClients, fake_portal: FakePortal, tmp_path: Path
) -> None:
    store = await store_of(tmp_path)
    record = await install(store, fake_portal.rest, "m1")
    portal = clients.for_event(deal_event("m1", 42))
    with pytest.raises(PortalError) as missing:
        await portal.call("crm.nothing.here")
    assert missing.value.code == "ERROR_METHOD_NOT_FOUND" and missing.value.status == 404
    # The portal's description quotes the request, the token it came with too.
    with pytest.raises(PortalError) as caught:
        await portal.call("crm.deal.echo", {"id": 1})
    assert caught.value.code == "INVALID_REQUEST" and "auth=***" in caught.value.description
    assert fake_portal.rest.used_tokens[-1] == record.access_token
    fake_portal.rest.time_limited.add("crm.deal.get")
    with pytest.raises(PortalRetry) as limited:
        await portal.call("crm.deal.get", {"id": 1})
    # A Retry for the event (the worker retries it later), not a busy wait in the handler.
    # Held until the portal's `operating_reset_at` (the fake: 10 minutes on).
    assert isinstance(limited.value, Retry) and 590 < limited.value.delay_s <= 600
    assert limited.value.code == "OPERATION_TIME_LIMIT"
    with pytest.raises(PortalError, match="BAD_METHOD"):
        await portal.call("../../oauth/token/?x=")
    for shown in (str(caught.value), repr(caught.value), repr(portal), repr(record)):
        assert record.access_token not in shown and record.refresh_token not in shown
    # A batch's command errors are the portal's descriptions too.
    (echoed,) = (await portal.batch({"e": ("crm.deal.echo", {"id": 1})})).values()
    assert isinstance(echoed, PortalError) and record.access_token not in str(echoed)
    await store.close()


async def test_answers_nested_too_deep_are_bad_answers(
    clients: PortalClients, fake_portal: FakePortal, tmp_path: Path
) -> None:
    store = await store_of(tmp_path)
    await install(store, fake_portal.rest, "m1")
    with pytest.raises(PortalError, match="BAD_ANSWER"):
        await clients.for_event(deal_event("m1", 1)).call("crm.deal.deep")
    await store.close()


async def test_paging_must_move_past_each_page(
    clients: PortalClients, fake_portal: FakePortal, tmp_path: Path
) -> None:
    store = await store_of(tmp_path)
    await install(store, fake_portal.rest, "m1")
    portal = clients.for_event(deal_event("m1", 1))
    given: list[str] = []
    with pytest.raises(PortalError, match="BAD_ANSWER"):
        async for item in portal.list("crm.deal.stuck", max_items=1000):
            given.append(item["ID"])
    assert given == [str(i) for i in range(50)]  # the first page, then the bad `next`
    await store.close()


async def test_64_concurrent_handlers_never_exceed_the_bucket(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    rest.burst, rest.drain_per_s = 25, 25.0  # Bitrix24's shape, time scaled down
    settings = portal_settings(
        portal_certificate[0],
        f"sqlite:{tmp_path / 'portals.db'}",
        portal_burst=25,
        portal_drain_per_s=25,
        portal_max_wait_s=30,
    )
    store = await store_of(tmp_path)
    await install(store, rest, "m1")
    await install(store, rest, "m2")
    async with PortalClients(settings, resolver=StaticResolver()) as clients:

        async def handler(member: str, deal: int) -> None:
            portal = clients.for_event(deal_event(member, deal))
            await portal.call("crm.deal.get", {"id": deal})
            await portal.call("crm.deal.get", {"id": deal})

        started = time.monotonic()
        await asyncio.gather(*(handler("m1", i) for i in range(1, 65)), handler("m2", 1))
        took = time.monotonic() - started
    assert rest.over_limit == 0
    assert rest.max_level["m1.portal.test"] <= 25
    # The other portal has a bucket of its own: not held up behind m1's.
    assert rest.max_level["m2.portal.test"] <= 2
    served = [t for host, _, t in rest.served if host == "m1.portal.test"]
    assert len(served) == 128
    span = served[-1] - served[0]
    rate = (len(served) - 12) / span  # after the first 12 (our bucket's capacity) went at once
    allowed = 25 + 25 * span  # the most the portal's bucket lets through in that time
    print(f"\n128 calls by 64 handlers in {span:.2f}s: {rate:.1f}/s after the burst (drain 25/s);")
    print(f"the portal would have let {allowed:.0f} through in that time; took {took:.1f}s")
    assert 10 < rate <= 25 * 1.1
    await store.close()


async def test_a_bucket_full_for_longer_than_the_wait_retries_the_event(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = portal_settings(
        portal_certificate[0],
        f"sqlite:{tmp_path / 'portals.db'}",
        portal_burst=4,
        portal_drain_per_s=1,
        portal_max_wait_s=0.5,
    )
    store = await store_of(tmp_path)
    await install(store, fake_portal.rest, "m1")
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        portal = clients.for_event(deal_event("m1", 1))
        await portal.call("crm.deal.get", {"id": 1})
        await portal.call("crm.deal.get", {"id": 1})  # capacity 4 - 2 of headroom
        with pytest.raises(PortalRetry, match="QUERY_LIMIT_EXCEEDED"):
            await portal.call("crm.deal.get", {"id": 1})
    await store.close()


async def test_query_limit_exceeded_is_resent(
    clients: PortalClients, fake_portal: FakePortal, tmp_path: Path
) -> None:
    store = await store_of(tmp_path)
    await install(store, fake_portal.rest, "m1")
    rest = fake_portal.rest
    # Someone else filled it, and then some: at 20/s it takes the fake 0.55 s to take a call
    # again, so the first call is refused however slow the machine is to send it (it was not
    # always, when the bucket was filled only to the brim).
    rest.buckets["m1.portal.test"] = (rest.burst + 10, time.monotonic())
    rest.drain_per_s = 20.0
    assert (await clients.for_event(deal_event("m1", 5)).call("crm.deal.get", {"id": 5}))["ID"]
    assert rest.over_limit >= 1
    await store.close()


async def test_a_portal_uses_its_own_credentials_only(
    clients: PortalClients, fake_portal: FakePortal, tmp_path: Path
) -> None:
    store = await store_of(tmp_path)
    await install(store, fake_portal.rest, "m1")
    await install(store, fake_portal.rest, "m2")
    # m2's member_id with m1's domain: refused before any call.
    forged = deal_event("m2", 1, domain="m1.portal.test")
    with pytest.raises(PortalError, match="WRONG_PORTAL"):
        await clients.for_event(forged).call("crm.deal.get", {"id": 1})
    with pytest.raises(PortalError, match="NO_CREDENTIALS"):
        await clients.for_event(deal_event("m3", 1)).call("crm.deal.get", {"id": 1})
    # m2's member_id and domain, let in by a static token (an outgoing webhook's, of another
    # portal): not m2's own application token, so not m2's credentials.
    payload = deal_event("m2", 1).payload
    payload["auth"]["application_token"] = "a-static-token"
    with pytest.raises(PortalError, match="application token"):
        await clients.for_event(Event.from_payload(payload)).call("crm.deal.get", {"id": 1})
    assert fake_portal.rest.served == []
    await store.close()


async def test_the_stored_token_never_the_events_own(
    clients: PortalClients, fake_portal: FakePortal, tmp_path: Path
) -> None:
    """An event built with its OAuth pair (a queued one has none: the body leaves it out) still
    calls with the stored token; one revoked early is refreshed once and the call goes through."""
    rest = fake_portal.rest
    store = await store_of(tmp_path)
    record = await install(store, rest, "m1")
    own, _, expires = rest.issue("m1")
    await clients.for_event(deal_event("m1", 1, access=own, expires=expires)).call(
        "crm.deal.get", {"id": 1}
    )
    rest.expire(record.access_token)
    await clients.for_event(deal_event("m1", 1, access=own)).call("crm.deal.get", {"id": 1})
    fresh = await store.get("m1")
    assert fresh is not None and fresh.access_token not in (own, record.access_token)
    stored = record.access_token
    assert rest.used_tokens == [stored, stored, fresh.access_token]
    assert rest.refreshes == 1 and clients.refresher.refreshes == 1
    await store.close()


async def test_a_portal_name_leading_to_a_private_address_is_refused(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = portal_settings(
        portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}", portal_allow_private=False
    )
    store = await store_of(tmp_path)
    await install(store, fake_portal.rest, "m1")
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        with pytest.raises(PortalError, match="private address"):
            await clients.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
    assert fake_portal.rest.used_tokens == []
    await store.close()


async def test_operation_time_limit_retries_the_event_after_its_delay(
    clients: PortalClients, fake_portal: FakePortal, tmp_path: Path
) -> None:
    from b24queue.testing import run_handler
    from examples.deals import DealSync

    store = await store_of(tmp_path)
    await install(store, fake_portal.rest, "m1")
    fake_portal.rest.time_limited.add("crm.deal.get")
    consumer = DealSync()
    consumer.portals = clients
    outcome = await run_handler(consumer, deal_event("m1", 5))
    # Through the worker's own rules: a retry, its 60 s snapped to the consumer's retry queues
    # as every Retry delay is (DealSync declares 1, 5 and 30 s: the longest).
    assert outcome.retried and outcome.delay_s == 30
    assert isinstance(outcome.error, PortalRetry)
    await store.close()


async def test_calls_waits_and_refreshes_are_counted(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from b24queue.telemetry.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    rest = fake_portal.rest
    store = await store_of(tmp_path)
    record = await install(store, rest, "m1")
    rest.expire(record.access_token)
    rest.time_limited.add("crm.deal.list")
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}")
    async with PortalClients(settings, resolver=StaticResolver(), observer=metrics) as clients:
        portal = clients.for_event(deal_event("m1", 1))
        await portal.call("crm.deal.get", {"id": 1})
        with pytest.raises(PortalError):
            await portal.call("crm.deal.get", {"id": 999})
        with pytest.raises(PortalRetry):
            await portal.call("crm.deal.list")
    text = metrics.render().decode()
    assert 'b24queue_portal_calls_total{answer="expired_token"} 1.0' in text
    assert 'b24queue_portal_calls_total{answer="ok"} 1.0' in text
    assert 'b24queue_portal_calls_total{answer="error"} 1.0' in text  # NOT_FOUND: no own label
    assert 'b24queue_portal_calls_total{answer="OPERATION_TIME_LIMIT"} 1.0' in text
    assert "b24queue_portal_refreshes_total 1.0" in text
    assert "b24queue_portal_wait_seconds_count 4.0" in text
    await store.close()


async def test_an_answer_over_the_cap_is_refused_and_the_cap_is_a_setting(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    store = await store_of(tmp_path)
    await install(store, fake_portal.rest, "m1")
    settings = portal_settings(
        portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}",
        portal_max_answer_bytes=100_000,
    )  # fmt: skip
    assert portal_settings(portal_certificate[0], "sqlite:x").portal_max_answer_bytes == 16 << 20
    async with PortalClients(settings, resolver=StaticResolver()) as small:
        portal = small.for_event(deal_event("m1", 1))
        with pytest.raises(PortalError, match="ANSWER_TOO_LARGE") as caught:
            await portal.call("crm.deal.pieces")  # 200,000 bytes
        assert "B24QUEUE_PORTAL_MAX_ANSWER_BYTES" in str(caught.value)
        assert (await portal.call("crm.deal.get", {"id": 1}))["ID"] == "1"  # under it: as ever
    await store.close()


async def test_one_portal_cannot_hold_every_connection(clients: PortalClients) -> None:
    assert clients._context is not None
    connector = clients._context.session.connector  # the session every client shares
    assert connector is not None and 0 < connector.limit_per_host <= 10 < connector.limit


async def test_token_refreshes_are_not_held_to_one_portals_share(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    # Every portal's refresh goes to the one OAuth server: more at once than a portal's
    # CONNECTIONS_PER_HOST all reach it (while it is slow to answer).
    rest = fake_portal.rest
    rest.oauth_gate = asyncio.Event()
    store = await store_of(tmp_path)
    members = [f"m{i}" for i in range(15)]
    for member in members:
        rest.expire((await install(store, rest, member)).access_token)
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}")
    try:
        async with PortalClients(settings, resolver=StaticResolver()) as clients:
            calls = [
                asyncio.create_task(
                    clients.for_event(deal_event(m, 1)).call("crm.deal.get", {"id": 1})
                )
                for m in members
            ]
            async with asyncio.timeout(5):
                while rest.oauth_requests < len(members):
                    await asyncio.sleep(0.02)
            rest.oauth_gate.set()
            await asyncio.gather(*calls)
        assert rest.refreshes == len(members)
    finally:
        rest.oauth_gate.set()
        await store.close()
