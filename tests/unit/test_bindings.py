"""Online event bindings (b24queue.offline.bindings) against the fake portal's event.bind,
event.get and event.unbind: dropped bindings come back (also at an ONAPPUPDATE), a binding the
app does not own is never removed, two reconcilers at once do the work once (SQLite and Redis
leases), --dry-run changes nothing; the wanted set from the consumers and the explicit list; a
hostile event.get bounded."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from b24queue.auth.record import PortalRecord
from b24queue.auth.store import SqliteTokenStore
from b24queue.consumer import EventConsumer
from b24queue.errors import ConfigError
from b24queue.events.event import Event
from b24queue.offline.bind import portal_event
from b24queue.offline.bindings import (
    MAX_BINDINGS,
    BindingsService,
    Reconciler,
    lifecycle_consumer,
    portal_bindings,
    read_bindings,
    wanted_events,
)
from b24queue.portal.clients import PortalClients
from b24queue.portal.redis_state import RedisState
from b24queue.portal.sqlite_state import SqliteState
from b24queue.portal.state import SharedState
from b24queue.settings import Settings
from tests.support.fake_events import Bound, FakeEvents
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.portal_setup import domain_of, install, portal_settings
from tests.support.wait import wait_until

OURS = "https://app.example.com/b24/events"
THEIRS = "https://other-app.example.net/hook"
WANTED = ("ONCRMDEALADD", "ONCRMDEALUPDATE")


class Deals(EventConsumer):
    queue = "deals"
    events = ("ONCRMDEALADD", "onCrmDealUpdate")

    async def handle(self, event: Event) -> None:
        return None


class Catalog(EventConsumer):
    queue = "catalog"
    events = ("CATALOG.#",)

    async def handle(self, event: Event) -> None:
        return None


class Setup:
    def __init__(self, fake: FakePortal, cert: Path, tmp_path: Path) -> None:
        self.fake = fake
        self.events = FakeEvents.attach(fake.rest)
        self.store_spec = f"sqlite:{tmp_path / 'portals.db'}"
        self.store = SqliteTokenStore(tmp_path / "portals.db")
        self.state_path = tmp_path / "portals.db"
        self.cert = cert

    def settings(self, **extra: Any) -> Settings:
        values = {"events_handler_url": OURS, **extra}
        return portal_settings(self.cert, self.store_spec, **values)

    async def install(self, member: str) -> PortalRecord:
        self.fake.rest.drain_per_s = 100.0
        return await install(self.store, self.fake.rest, member)


@pytest.fixture
async def setup(
    fake_portal: FakePortal, portal_certificate: Any, tmp_path: Path
) -> AsyncIterator[Setup]:
    s = Setup(fake_portal, portal_certificate[0], tmp_path)
    try:
        yield s
    finally:
        await s.store.close()


async def reconcile(s: Setup, record: PortalRecord, state: SharedState, **kw: Any) -> Any:
    settings = s.settings()
    async with PortalClients(
        settings, store=s.store, state=state, resolver=StaticResolver()
    ) as clients:
        return await Reconciler(settings, clients.for_event, state, WANTED).reconcile(record, **kw)


async def test_dropped_bindings_come_back(setup: Setup) -> None:
    record = await setup.install("mdrop")
    host = domain_of("mdrop")
    state = SqliteState(setup.state_path)
    try:
        done = await reconcile(setup, record, state)
        assert done is not None and done.ok
        assert {(b.event, b.handler) for b in setup.events.of(host)} == {(e, OURS) for e in WANTED}
        # The app updated: Bitrix24 dropped its bindings; one more was lost at install.
        setup.events.bindings[host] = [Bound("ONCRMDEALADD", OURS)]
        again = await reconcile(setup, record, state)
        assert again is not None and again.bind == ["ONCRMDEALUPDATE"] and again.ok
        assert {b.event for b in setup.events.of(host)} == set(WANTED)
        # Nothing missing: nothing called but event.get.
        binds = setup.events.count("event.bind")
        nothing = await reconcile(setup, record, state)
        assert nothing is not None and nothing.bind == [] and nothing.unbind == []
        assert setup.events.count("event.bind") == binds
    finally:
        await state.close()


async def test_onappupdate_reconciles_that_portal_at_once(setup: Setup) -> None:
    """The lifecycle consumer (in `b24queue offline`) hands the portal to the service, which
    binds its events without waiting for the hourly round; a forged token is ignored."""
    record = await setup.install("mupd")
    host = domain_of("mupd")
    settings = setup.settings()
    state = SqliteState(setup.state_path)
    stop = asyncio.Event()
    try:
        async with PortalClients(
            settings, store=setup.store, state=state, resolver=StaticResolver()
        ) as clients:
            service = BindingsService(
                Reconciler(settings, clients.for_event, state, WANTED), setup.store
            )
            running = asyncio.create_task(service.run(stop))
            await wait_until(lambda: len(setup.events.of(host)) == 2, 10, "bound at start")
            setup.events.bindings[host] = []  # the update dropped them
            consumer = lifecycle_consumer(settings, service)()
            forged = {"member_id": "mupd", "domain": host, "application_token": "forged"}
            await consumer.handle(Event.from_payload({"event": "ONAPPUPDATE", "auth": forged}))
            await asyncio.sleep(0.3)
            assert setup.events.of(host) == []  # a forged token: nothing done
            await consumer.handle(portal_event(record).model_copy(update={"name": "ONAPPUPDATE"}))
            await wait_until(lambda: len(setup.events.of(host)) == 2, 10, "bound again")
            stop.set()
            await asyncio.wait_for(running, 10)
    finally:
        stop.set()
        await state.close()


async def test_a_binding_the_app_does_not_own_is_never_removed(setup: Setup) -> None:
    record = await setup.install("mforeign")
    host = domain_of("mforeign")
    foreign = [
        Bound("ONCRMLEADADD", THEIRS),  # another app's, an event we do not want
        Bound("ONCRMDEALADD", THEIRS, "15"),  # another app's, an event we want too
        Bound("ONCRMLEADADD", OURS + "/old"),  # an old URL of ours: not our handler now
    ]
    setup.events.bindings[host] = [*foreign, Bound("ONCRMLEADADD", OURS, "7")]  # ours, unwanted
    state = SqliteState(setup.state_path)
    try:
        done = await reconcile(setup, record, state)
    finally:
        await state.close()
    assert done is not None and done.ok and done.foreign == 3
    assert [b.event for b in done.unbind] == ["ONCRMLEADADD"]
    left = setup.events.of(host)
    assert all(b in left for b in foreign)
    assert Bound("ONCRMLEADADD", OURS, "7") not in left
    assert {b.event for b in left if b.handler == OURS} == set(WANTED)
    # Every unbind names the event, our handler and the binding's auth_type: event.unbind
    # removes whatever matches the parameters left out.
    unbinds = [p for _, m, p in setup.events.calls if m == "event.unbind"]
    assert unbinds == [{"event": "ONCRMLEADADD", "handler": OURS, "auth_type": "7"}]


def _state(kind: str, tmp_path: Path, prefix: str) -> SharedState:
    if kind == "sqlite":
        return SqliteState(tmp_path / "portals.db")
    return RedisState("redis://127.0.0.1:6379/0", prefix)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_two_reconcilers_at_once_do_the_work_once(
    setup: Setup, tmp_path: Path, kind: str
) -> None:
    """Two reconcilers (each with its own connection to the shared state, as two processes)
    start on the same portal at once: one holds the lease and binds, the other skips it."""
    record = await setup.install("mtwice")
    setup.events.slow_s = 0.2  # the first is still binding when the second looks
    prefix = f"b24queue-test-{uuid.uuid4().hex[:8]}:"
    states = [_state(kind, tmp_path, prefix) for _ in range(2)]
    try:
        results = await asyncio.gather(*(reconcile(setup, record, st) for st in states))
    finally:
        for st in states:
            await st.close()
    assert sorted(r is None for r in results) == [False, True]
    assert setup.events.count("event.bind") == len(WANTED)
    assert setup.events.count("event.get") == 1
    assert {b.event for b in setup.events.of(domain_of("mtwice"))} == set(WANTED)


async def test_dry_run_changes_nothing(setup: Setup) -> None:
    await setup.install("mdry")
    host = domain_of("mdry")
    setup.events.bindings[host] = [Bound("ONCRMLEADADD", OURS), Bound("ONCRMLEADADD", THEIRS)]
    before = list(setup.events.of(host))
    settings = setup.settings(events_bind="ONCRMCONTACTADD")
    lines, ok = await portal_bindings(
        settings, [Deals], None, dry_run=True, resolver=StaticResolver()
    )
    assert ok
    assert setup.events.of(host) == before
    assert setup.events.count("event.bind") == setup.events.count("event.unbind") == 0
    assert "  would bind ONCRMDEALADD" in lines and "  would bind ONCRMCONTACTADD" in lines
    assert "  would unbind ONCRMLEADADD (auth_type 0)" in lines
    # The same command without --dry-run applies what it showed.
    lines, ok = await portal_bindings(
        settings, [Deals], "mdry", dry_run=False, resolver=StaticResolver()
    )
    assert ok, lines
    assert {(b.event, b.handler) for b in setup.events.of(host)} == {
        ("ONCRMDEALADD", OURS),
        ("ONCRMDEALUPDATE", OURS),
        ("ONCRMCONTACTADD", OURS),
        ("ONCRMLEADADD", THEIRS),
    }


async def test_a_hostile_event_get_is_bounded(setup: Setup) -> None:
    record = await setup.install("mhostile")
    huge = "https://x.example/" + "a" * 100_000
    setup.events.get_extra = [
        "not an object",
        {"event": "ON" + "X" * 500, "handler": OURS, "auth_type": "0", "offline": 0},
        {"event": "ONCRMLEADADD", "handler": OURS, "auth_type": "0; DROP", "offline": 0},
        {"event": "ONCRMLEADADD", "handler": huge, "auth_type": "0", "offline": 0},
        *({"event": "ONCRMLEADADD", "handler": THEIRS, "offline": 0} for _ in range(5000)),
    ]
    settings = setup.settings()
    async with PortalClients(settings, store=setup.store, resolver=StaticResolver()) as clients:
        found, read = await read_bindings(clients.for_event(portal_event(record)))
    assert read == MAX_BINDINGS and len(found) <= MAX_BINDINGS
    assert all(len(b.handler) <= 2000 and len(b.event) <= 128 for b in found)
    state = SqliteState(setup.state_path)
    try:
        done = await reconcile(setup, record, state)
    finally:
        await state.close()
    assert done is not None and done.unbind == []  # nothing malformed is taken for ours


def test_wanted_events_from_consumers_and_the_explicit_list(setup: Setup) -> None:
    settings = setup.settings(events_bind="ONCRMDEALADD,onTaskAdd")
    assert wanted_events(settings, [Deals]) == ("ONCRMDEALADD", "ONCRMDEALUPDATE", "ONTASKADD")
    # A pattern: skipped with the explicit list given, an error naming the consumer without.
    assert wanted_events(settings, [Catalog]) == ("ONCRMDEALADD", "ONTASKADD")
    with pytest.raises(ConfigError, match=r"Catalog\.events: 'CATALOG\.#'"):
        wanted_events(setup.settings(), [Catalog])
    with pytest.raises(ConfigError, match="B24QUEUE_EVENTS_BIND"):
        wanted_events(setup.settings(events_bind="ON CRM"), [])
    # Nothing wanted would unbind every binding of ours: refused, not done.
    with pytest.raises(ConfigError, match="no event is wanted"):
        wanted_events(setup.settings(), [])


@pytest.mark.parametrize(
    "url", ["http://app.example.com/b24", "https://u:p@app.example.com/", "https:///x", "ftp://a"]
)
def test_the_handler_url_must_be_https(setup: Setup, url: str) -> None:
    with pytest.raises(ConfigError, match="B24QUEUE_EVENTS_HANDLER_URL"):
        setup.settings(events_handler_url=url)
