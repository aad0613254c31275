"""Issue 36, findings 2 and 7: answers from servers we do not run (portals, the OAuth server, the
RabbitMQ management API) are bounded in what they decode into, not only in bytes, and no
redirect is followed with our credentials. Against real HTTP servers on loopback: the fake
portal (HTTPS) and plain aiohttp servers."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from b24queue.auth.install import PortalCallback
from b24queue.auth.store import SqliteTokenStore
from b24queue.cli.send import post
from b24queue.errors import ConfigError, ManagementError, UnauthorizedError
from b24queue.offline.puller import Puller, Target
from b24queue.outbound.answers import Bounds, NotJSON, count_values, decode_json
from b24queue.portal.api import PortalError, PortalRetry
from b24queue.portal.clients import PortalClients
from b24queue.settings import load_settings
from b24queue.telemetry.metrics import OfflineMetrics
from b24queue.transports.amqp import management
from b24queue.transports.amqp.management import ManagementClient
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.fake_rest import CLIENT_SECRET
from tests.support.offline_stubs import State
from tests.support.portal_setup import (
    deal_event,
    install,
    portal_event,
    portal_settings,
    verifier_settings,
)
from tests.support.sinks import MemorySink

MIB = 1024 * 1024

# -- the shape of real answers (crm.deal.get's documented answer, and custom fields) -----------

_DEAL = {
    "ID": "410", "TITLE": "New Deal #1", "TYPE_ID": "COMPLEX", "STAGE_ID": "PREPARATION",
    "PROBABILITY": "99", "CURRENCY_ID": "EUR", "OPPORTUNITY": "1000000.00",
    "IS_MANUAL_OPPORTUNITY": "Y", "TAX_VALUE": "0.00", "LEAD_ID": None, "COMPANY_ID": "9",
    "CONTACT_ID": "84", "QUOTE_ID": None, "BEGINDATE": "2024-08-30T02:00:00+02:00",
    "CLOSEDATE": "2024-09-09T02:00:00+02:00", "ASSIGNED_BY_ID": "1", "CREATED_BY_ID": "1",
    "MODIFY_BY_ID": "1", "DATE_CREATE": "2024-08-30T14:29:00+02:00",
    "DATE_MODIFY": "2024-08-30T14:29:00+02:00", "OPENED": "Y", "CLOSED": "N",
    "COMMENTS": "[B]Example comment[/B], with a comma", "ADDITIONAL_INFO": "Additional information",
    "LOCATION_ID": None, "CATEGORY_ID": "0", "STAGE_SEMANTIC_ID": "P", "IS_NEW": "N",
    "IS_RECURRING": "N", "IS_RETURN_CUSTOMER": "N", "IS_REPEATED_APPROACH": "N",
    "SOURCE_ID": "CALLBACK", "SOURCE_DESCRIPTION": "Additional source information",
    "ORIGINATOR_ID": None, "ORIGIN_ID": None, "MOVED_BY_ID": "1",
    "MOVED_TIME": "2024-08-30T14:29:00+02:00", "LAST_ACTIVITY_TIME": "2024-08-30T14:29:00+02:00",
    "UTM_SOURCE": "google", "UTM_MEDIUM": "CPC", "UTM_CAMPAIGN": None, "UTM_CONTENT": None,
    "UTM_TERM": None, "PARENT_ID_1220": "22", "LAST_ACTIVITY_BY": "1",
}  # fmt: skip
_TIME = {
    "start": 1725020945.541275, "finish": 1725020946.179076, "duration": 0.637800931930542,
    "processing": 0.21427488327026367, "date_start": "2024-08-30T14:29:05+02:00",
    "date_finish": "2024-08-30T14:29:06+02:00", "operating": 0,
}  # fmt: skip


def full_deal(i: int) -> dict[str, Any]:
    """A deal with every field (select ["*", "UF_*"]): 45 standard and 50 custom fields, every
    fifth of them multiple."""
    deal: dict[str, Any] = {**_DEAL, "ID": str(i), "TITLE": f"Deal #{i}"}
    for k in range(50):
        deal[f"UF_CRM_17212444822{k:02d}"] = ["12", "13"] if k % 5 == 0 else f"value {i}, {k}"
    return deal


def full_batch_answer() -> bytes:
    """`batch` of 50 crm.deal.list commands, each a full page of 50 such deals (2,500 deals)."""
    names = [f"c{j}" for j in range(50)]
    result = {
        "result": {n: [full_deal(j * 50 + i) for i in range(50)] for j, n in enumerate(names)},
        "result_error": [],
        "result_total": {n: 5000 for n in names},
        "result_next": {n: 50 * (j + 1) for j, n in enumerate(names)},
        "result_time": {n: _TIME for n in names},
    }
    return json.dumps({"result": result, "time": _TIME}).encode()


def padded(size: int) -> bytes:
    return json.dumps({"result": {"PAD": "x" * size}}).encode()


def empty_objects(size: int) -> bytes:
    """The review's answer: `size` bytes of `{},` in a result (decodes into 23 bytes a byte)."""
    n = (size - 20) // 3
    return b'{"result":[' + b"{}," * n + b"{}]}"


def offline_record(i: int) -> dict[str, Any]:
    """An offline record of about 900 values (450 empty objects beside its deal)."""
    return {
        "ID": str(i),
        "TIMESTAMP_X": "2026-11-29T23:00:00+03:00",
        "EVENT_NAME": "ONCRMDEALUPDATE",
        "MESSAGE_ID": f"msg{i}",
        "EVENT_DATA": {"FIELDS": {"ID": str(i)}, "PAD": [{}] * 450},
        "EVENT_ADDITIONAL": {},
    }


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteTokenStore]:
    s = SqliteTokenStore(tmp_path / "portals.db")
    yield s
    await s.close()


def settings(cert: tuple[Path, Path], tmp_path: Path, **extra: Any) -> Any:
    return portal_settings(cert[0], f"sqlite:{tmp_path / 'portals.db'}", **extra)


def clients(cert: tuple[Path, Path], tmp_path: Path, **extra: Any) -> PortalClients:
    return PortalClients(settings(cert, tmp_path, **extra), resolver=StaticResolver())


# -- finding 2: bounded in values ------------------------------------------------------------


async def test_a_portal_answer_of_many_values_is_refused_before_it_is_decoded(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    store: SqliteTokenStore,
) -> None:
    """The review's answer: 14 MB of empty objects, under the byte cap, decoded into ~330 MiB.
    Now it is refused with an ordinary PortalError (the worker retries the event), naming the
    bound and by how much, and the call holds about what it read."""
    await install(store, fake_portal.rest, "m1")
    fake_portal.rest.raw["crm.deal.list"] = empty_objects(14_000_000)
    async with PortalClients(
        settings(portal_certificate, tmp_path), resolver=StaticResolver()
    ) as c:
        portal = c.for_event(deal_event("m1", 1))
        gc.collect()
        tracemalloc.start()
        try:
            with pytest.raises(PortalError) as caught:
                await portal.call("crm.deal.list")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    error = caught.value
    assert error.code == "ANSWER_TOO_LARGE" and not isinstance(error, PortalRetry)
    assert "9,333,324 JSON values, 8,333,324 over the limit of 1,000,000" in str(error)
    assert "B24QUEUE_PORTAL_MAX_ANSWER_VALUES" in str(error) and "{}" not in str(error)
    # The 14 MB read (and the server's copy being written, in this process too), never the
    # decoded objects.
    assert peak < 64 * MIB, f"{peak / MIB:.0f} MiB traced while refusing it"


async def test_real_answers_pass_the_default_bounds_with_a_margin(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    store: SqliteTokenStore,
) -> None:
    """A batch of 50 full crm.deal.list pages (2,500 deals with every field) is the largest real
    answer: 8 MB, 290,566 values (398,067 counting the commas in its texts). The defaults take
    2.5 times that; a page of 50 deals (5,812 values) 172 times."""
    await install(store, fake_portal.rest, "m1")
    batch = full_batch_answer()
    assert len(batch) < 16 * MIB / 2 and count_values(batch) < 1_000_000 / 2.5
    assert count_values(batch, exact=True) == 290_566
    page = {"result": [full_deal(i) for i in range(50)], "next": 50, "total": 5000, "time": _TIME}
    raw_page = json.dumps(page).encode()
    assert count_values(raw_page, exact=True) == 5_812
    fake_portal.rest.raw["batch"] = batch
    fake_portal.rest.raw["crm.deal.list"] = raw_page
    async with PortalClients(
        settings(portal_certificate, tmp_path), resolver=StaticResolver()
    ) as c:
        portal = c.for_event(deal_event("m1", 1))
        pages = await portal.batch({f"c{j}": ("crm.deal.list", {"start": 0}) for j in range(50)})
        assert sum(len(p) for p in pages.values()) == 2500 and pages["c49"][49]["ID"] == "2499"
        assert len(pages["c0"][0]) == 95
        deals = [d async for d in portal.list("crm.deal.list", max_items=50)]
        assert len(deals) == 50


async def test_answers_read_at_once_share_one_budget(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    store: SqliteTokenStore,
) -> None:
    """Two answers arriving together that would take the process past its budget: the second
    fails at once with PortalRetry (the event is retried later), the first is not disturbed,
    and once it is done the budget is whole again."""
    await install(store, fake_portal.rest, "m1")
    rest = fake_portal.rest
    gate = asyncio.Event()
    rest.raw["crm.deal.first"] = padded(3 * MIB + MIB // 2)
    rest.raw_gate["crm.deal.first"] = (3 * MIB, gate)  # 3 MiB, then the rest when let through
    rest.raw["crm.deal.second"] = padded(3 * MIB + 600_000)
    bounded = settings(
        portal_certificate, tmp_path, portal_max_answer_bytes=4 * MIB,
        portal_max_answer_values=10_000, portal_answers_budget_bytes=6 * MIB + MIB // 2,
    )  # fmt: skip
    try:
        async with PortalClients(bounded, resolver=StaticResolver()) as c:
            portal = c.for_event(deal_event("m1", 1))
            first = asyncio.create_task(portal.call("crm.deal.first"))
            assert c._context is not None
            budget = c._context.budget
            assert budget is not None
            async with asyncio.timeout(10):
                while budget.in_use < 3 * MIB:  # the first answer's 3 MiB are read
                    await asyncio.sleep(0.01)
            with pytest.raises(PortalRetry) as caught:
                await portal.call("crm.deal.second")
            assert caught.value.code == "ANSWERS_BUSY" and caught.value.delay_s == 5.0
            assert "B24QUEUE_PORTAL_ANSWERS_BUDGET_BYTES" in str(caught.value)
            gate.set()
            assert len((await first)["PAD"]) == 3 * MIB + MIB // 2
            assert budget.in_use == 0
            assert len((await portal.call("crm.deal.second"))["PAD"]) == 3 * MIB + 600_000
            assert budget.in_use == 0
    finally:
        gate.set()


def test_the_budget_holds_at_least_one_answer_of_the_largest_size() -> None:
    with pytest.raises(ConfigError, match="B24QUEUE_PORTAL_ANSWERS_BUDGET_BYTES"):
        load_settings(portal_max_answer_values=2_000_000)  # 16 MiB + 400 MB > 256 MiB
    load_settings(portal_max_answer_values=2_000_000, portal_answers_budget_bytes=512 * MIB)


async def test_the_offline_puller_asks_for_fewer_records_when_they_hold_too_many_values(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    store: SqliteTokenStore,
) -> None:
    """event.offline.get answers through the same client: records of about 900 values each
    are over a bound of 10,000 at 50, 25 and 12 a get, and read at 6."""
    await install(store, fake_portal.rest, "m1")
    asked: list[int] = []

    def offline_get(params: dict[str, Any]) -> bytes:
        limit = int(params["limit"])
        asked.append(limit)
        events = [offline_record(i) for i in range(1, limit + 1)]
        return json.dumps({"result": {"process_id": "p1", "events": events}}).encode()

    fake_portal.rest.raw["event.offline.get"] = offline_get
    fake_portal.rest.raw["event.offline.clear"] = b'{"result":true}'
    bounded = settings(portal_certificate, tmp_path, portal_max_answer_values=10_000)
    async with PortalClients(bounded, resolver=StaticResolver()) as c:
        target = Target("m1", "m1.portal.test", "b24queue", 50, 2**20, 30.0, "digest")
        sink = MemorySink()
        puller = Puller(c.for_event(deal_event("m1", 1)), sink, State(), target, OfflineMetrics())
        assert await puller.pull_once() == 6
    assert asked == [50, 25, 12, 6] and len(sink.published) == 6


async def test_an_install_callback_answer_of_many_values_is_refused(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path]
) -> None:
    """app.info answered with 20,000 empty objects in 60 KB (under the 64 KiB cap)."""
    async with PortalCallback(
        verifier_settings(portal_certificate[0]), resolver=StaticResolver()
    ) as cb:
        event = portal_event(
            "ONAPPINSTALL", endpoint=fake_portal.endpoint("acme.portal.test"), access="crowded"
        )
        with pytest.raises(UnauthorizedError, match="40,005 JSON values, 30,005 over"):
            await cb.confirm(event)


async def test_an_oauth_answer_of_many_values_is_refused(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    store: SqliteTokenStore,
) -> None:
    rest = fake_portal.rest
    rest.expire((await install(store, rest, "m1")).access_token)
    rest.oauth_extra = {"scope": [{}] * 15_000}  # 60 KB, under the 64 KiB cap
    async with PortalClients(
        settings(portal_certificate, tmp_path), resolver=StaticResolver()
    ) as c:
        with pytest.raises(PortalError) as caught:
            await c.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
    assert caught.value.code == "BAD_ANSWER" and "30,01" in str(caught.value)
    assert "JSON values" in str(caught.value) and CLIENT_SECRET not in str(caught.value)


def test_values_are_counted_outside_texts_only() -> None:
    bounds = Bounds(100_000, 20)
    commas = json.dumps({"text": "," * 5000, "list": [1, 2, 3]}).encode()
    assert count_values(commas) > 20 and decode_json(commas, bounds)["list"] == [1, 2, 3]
    # Escaped quotes do not end a text; one left open runs to the end.
    tricky = b'{"a":"\\",[[[[[[[[[[[[","b":[' + b"{}," * 5 + b"{}]}"
    assert decode_json(tricky, bounds)["a"] == '",[[[[[[[[[[[['
    with pytest.raises(NotJSON):
        decode_json(b'["' + b"[" * 50, bounds)
    # UTF-16, where a byte of a character can look like a quote, is not read at all.
    with pytest.raises(NotJSON):
        decode_json('{"a": "\u2222", "b": []}'.encode("utf-16-le"), bounds)


# -- finding 7: no redirect followed ---------------------------------------------------------


class Recorder:
    """A second server, on another loopback address: records every request it gets."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append({"path": request.path_qs, **request.headers})
        return web.json_response([{"name": "stolen"}])


@pytest.fixture
async def redirect_pair() -> AsyncIterator[tuple[str, Recorder]]:
    """(the URL of a server that answers every request with a 302 to the recorder on
    127.0.0.2, the recorder)."""
    recorder = Recorder()
    elsewhere = web.Application()
    elsewhere.router.add_route("*", "/{tail:.*}", recorder.handle)
    target = TestServer(elsewhere, host="127.0.0.2")
    await target.start_server()

    async def moved(request: web.Request) -> web.Response:
        location = str(target.make_url(request.path)) + "?token=in-the-location"
        return web.Response(status=302, headers={"Location": location})

    first = web.Application()
    first.router.add_route("*", "/{tail:.*}", moved)
    source = TestServer(first, host="127.0.0.1")
    await source.start_server()
    try:
        yield str(source.make_url("")).rstrip("/"), recorder
    finally:
        await source.close()
        await target.close()


async def test_the_management_client_follows_no_redirect(
    redirect_pair: tuple[str, Recorder],
) -> None:
    """urllib follows a redirect to any host with every header: the broker's password went
    along in the Authorization header."""
    url, recorder = redirect_pair
    settings = load_settings(
        management_url=url, amqp_url="amqp://b24user:s3cret-pw@127.0.0.1:5672/"
    )
    client = ManagementClient(settings)
    with pytest.raises(ManagementError) as caught:
        await asyncio.to_thread(client.queues)
    assert recorder.seen == []
    text = str(caught.value)
    assert "HTTP 302" in text and "to http://127.0.0.2:" in text and "not followed" in text
    basic = base64.b64encode(b"b24user:s3cret-pw").decode()
    for secret in ("s3cret-pw", basic, "in-the-location", "/api/queues/%2F?"):
        assert secret not in text


async def test_management_answers_are_bounded_in_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def many(request: web.Request) -> web.Response:
        return web.Response(body=empty_objects(300_000), content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", many)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    monkeypatch.setattr(management, "BOUNDS", Bounds(MIB, 10_000))
    try:
        client = ManagementClient(load_settings(management_url=str(server.make_url(""))))
        with pytest.raises(ManagementError, match="199,990 JSON values, 189,990 over"):
            await asyncio.to_thread(client.queues)
    finally:
        await server.close()


async def test_send_follows_no_redirect(redirect_pair: tuple[str, Recorder]) -> None:
    url, recorder = redirect_pair
    status, _ = await asyncio.to_thread(post, url + "/b24/events", b"event=ONCRMDEALADD")
    assert status == 302 and recorder.seen == []


async def test_a_portal_redirect_is_an_error_naming_where_and_is_not_followed(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    store: SqliteTokenStore,
) -> None:
    """A 307 keeps the method and the body, our token in it, wherever it points."""
    rest = fake_portal.rest
    await install(store, rest, "m1")
    rest.moved["crm.deal.get"] = (307, "https://elsewhere.portal.test:8443/rest/x?code=abc")
    async with PortalClients(
        settings(portal_certificate, tmp_path), resolver=StaticResolver()
    ) as c:
        with pytest.raises(PortalError) as caught:
            await c.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
    assert caught.value.code == "REDIRECT" and caught.value.status == 307
    assert "HTTP 307" in str(caught.value)
    assert "to https://elsewhere.portal.test:8443: not followed" in str(caught.value)
    assert "abc" not in str(caught.value) and len(rest.used_tokens) == 1


async def test_an_oauth_redirect_is_an_error_and_is_not_followed(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    store: SqliteTokenStore,
) -> None:
    rest = fake_portal.rest
    rest.expire((await install(store, rest, "m1")).access_token)
    rest.oauth_moved = (302, "https://evil.example/steal?client_secret=echoed")
    async with PortalClients(
        settings(portal_certificate, tmp_path), resolver=StaticResolver()
    ) as c:
        with pytest.raises(PortalError) as caught:
            await c.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
    assert caught.value.code == "OAUTH_REDIRECT" and rest.oauth_requests == 1
    assert "redirect to https://evil.example: not followed" in str(caught.value)
    assert CLIENT_SECRET not in str(caught.value) and "echoed" not in str(caught.value)
