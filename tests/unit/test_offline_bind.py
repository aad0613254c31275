"""`portals bind-offline` and `offline-status` against the fake portal: event.bind with
event_type=offline and our auth_connector, and ONOFFLINEEVENT to the ingress; names checked
before any call; the queue's state read without reserving anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from b24queue.auth.store import SqliteTokenStore
from b24queue.cli.portals import render
from b24queue.errors import ConfigError
from b24queue.offline.bind import bind_events, check_names, portal_event
from b24queue.offline.inspect import queue_state
from b24queue.portal.clients import PortalClients
from tests.support.fake_offline import FakeOffline
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.portal_setup import install, portal_settings


async def test_binds_offline_events_and_the_ping(
    fake_portal: FakePortal, portal_certificate: Any, tmp_path: Path
) -> None:
    offline = FakeOffline.attach(fake_portal.rest)
    store = SqliteTokenStore(tmp_path / "portals.db")
    record = await install(store, fake_portal.rest, "mbind")
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        portal = clients.for_event(portal_event(record))
        done = await bind_events(
            portal, ["ONCRMDEALADD", "onCrmDealUpdate"], "b24queue", "https://app.example/b24"
        )
    assert [(b.event, b.outcome) for b in done] == [
        ("ONCRMDEALADD", "bound"),
        ("ONCRMDEALUPDATE", "bound"),
        ("ONOFFLINEEVENT", "bound"),
    ]
    queue = offline.queue("mbind.portal.test")
    assert queue.bindings == {"b24queue": {"ONCRMDEALADD", "ONCRMDEALUPDATE"}}
    assert queue.ping_handler == "https://app.example/b24"
    binds = [p for _, m, p in offline.calls if m == "event.bind"]
    assert binds[0] == {
        "event": "ONCRMDEALADD",
        "event_type": "offline",
        "auth_connector": "b24queue",
    }
    await store.close()


async def test_the_ping_binding_sets_min_timeout_when_asked(
    fake_portal: FakePortal, portal_certificate: Any, tmp_path: Path
) -> None:
    offline = FakeOffline.attach(fake_portal.rest)
    store = SqliteTokenStore(tmp_path / "portals.db")
    record = await install(store, fake_portal.rest, "mping")
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        portal = clients.for_event(portal_event(record))
        await bind_events(portal, ["ONCRMDEALADD"], "b24queue", "https://app.example/b24", 30)
        pings = [p for _, m, p in offline.calls if p.get("event") == "ONOFFLINEEVENT"]
        assert pings[-1]["options"] == {"minTimeout": 30}
        assert offline.queue("mping.portal.test").ping_min_timeout == 30
        # Only the ping's binding has it; and not asked for, it is not sent.
        assert all(
            "options" not in p
            for _, m, p in offline.calls
            if m == "event.bind" and p is not pings[-1]
        )
        await bind_events(portal, [], "b24queue", "https://app.example/b24")
        pings = [p for _, m, p in offline.calls if p.get("event") == "ONOFFLINEEVENT"]
        assert "options" not in pings[-1]
    await store.close()


@pytest.mark.parametrize("name", ["ON CRM", "ONCRM.#", "x" * 200, ""])
def test_names_are_checked_first(name: str) -> None:
    with pytest.raises(ConfigError):
        check_names([name])


async def test_offline_status_reads_the_queue_without_reserving(
    fake_portal: FakePortal, portal_certificate: Any, tmp_path: Path
) -> None:
    offline = FakeOffline.attach(fake_portal.rest)
    store = SqliteTokenStore(tmp_path / "portals.db")
    record = await install(store, fake_portal.rest, "mstat")
    host = "mstat.portal.test"
    offline.queue(host).bindings["b24queue"] = {"ONCRMDEALADD", "ONCRMDEALUPDATE"}
    for deal in range(1, 61):
        await offline.change(host, "ONCRMDEALUPDATE", deal)
    await offline.change(host, "ONCRMDEALADD", 1)
    got = await offline.answer(
        host, "event.offline.get", {"clear": 0, "limit": 5, "auth_connector": "b24queue"}
    )
    assert got is not None
    batch = got[1]["result"]
    marked = {"process_id": batch["process_id"], "message_id": [batch["events"][0]["MESSAGE_ID"]]}
    await offline.answer(host, "event.offline.error", {**marked, "auth_connector": "b24queue"})
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        state = await queue_state(clients.for_event(portal_event(record)), "b24queue")
    assert (state.waiting, state.reserved, state.errors) == (56, 4, 1) and state.complete
    assert state.by_event == {"ONCRMDEALUPDATE": 60, "ONCRMDEALADD": 1}
    assert render(state, as_json=False).startswith("56 waiting, 4 reserved")
    assert len([r for r in offline.waiting(host) if r.process_id]) == 5  # nothing reserved by it
    await store.close()
