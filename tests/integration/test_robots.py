"""Robots and workflow activities (b24queue.bizproc) end to end against the fake portal: the real
ingress verifying portals (PortalVerifier on a SQLite store), the SQLite transport, a Worker whose
portal clients reach the fake portal. A robot call is accepted, handled and answered once with its
return values (also when the first bizproc.event.send fails: the handler runs once); a call
dead-lettered tells its workflow and says so in the dead letter; a foreign portal's call is
refused (401) and an undeclared code too (400); the declarations are registered on a portal
(bizproc.robot.add, then .update) and a dry run changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from b24queue import Event, Reject
from b24queue import _constants as c
from b24queue.auth.portal import PortalVerifier
from b24queue.auth.store import SqliteTokenStore
from b24queue.bizproc import (
    Activity,
    Declarations,
    Property,
    Robot,
    RobotConsumer,
    answer_of,
    as_event,
    is_call,
    load_declarations,
)
from b24queue.cli.send import sample_call
from b24queue.delivery import Incoming, Outcome, give_up
from b24queue.errors import ConfigError
from b24queue.events.envelope import envelope_for
from b24queue.events.forms import decode_form, encode_form
from b24queue.ingress.app import create_app
from b24queue.offline.bind import portal_event
from b24queue.offline.bindings import Reconciler, describe, portal_bindings, wanted_events
from b24queue.offline.process import serve_offline
from b24queue.portal.clients import PortalClients
from b24queue.settings import Settings
from b24queue.telemetry.metrics import OfflineMetrics
from b24queue.transports import transport_for
from b24queue.worker import Worker, declare_topology
from tests.support import robot_worker
from tests.support.fake_bizproc import FakeBizproc
from tests.support.fake_events import FakeEvents
from tests.support.fake_offline import FakeOffline
from tests.support.fake_portal import CLIENT_ID, FakePortal, StaticResolver
from tests.support.fake_rest import CLIENT_SECRET
from tests.support.offline_setup import installed
from tests.support.portal_setup import OAUTH_URL, domain_of, install, portal_settings
from tests.support.processes import ROOT, STARTED
from tests.support.wait import wait_until

MEMBER = "mrobot1"
HOST = domain_of(MEMBER)
OURS = "https://app.example.com/b24/events"
TOKEN = (
    "55c1dc1c3f0d75.78875596|A51601_82584_96831_81132|hsyUws1j4XiwqPqN45eH66CcQtEvpUIP."
    "47dd5d888e8e549d2c984713e12a4268e6e87d0208ca1f093ba1075e77f92e90"
)
GREET = Robot(
    code="greet",
    name={"en": "Greet", "de": "Grüßen"},
    properties={"who": Property(name="Who", required=True)},
    return_properties={"greeting": Property(name="Greeting")},
    give_up_values={"greeting": ""},
)
runs: list[str] = []


class Greeter(RobotConsumer):
    queue = "robots.greet"
    bizproc = GREET
    retry_delays_s = (0.05,)
    max_attempts = 3

    async def handle(self, event: Event) -> Mapping[str, Any]:
        who = event.payload["properties"]["who"]
        runs.append(who)
        if who == "nobody":
            raise Reject(f"nobody to greet (token {event.payload['event_token']})")
        return {"greeting": f"Hello, {who}"}


ARCHIVE = Activity(code="archive_doc", name="Archive", use_subscription=False)


def robot_call(code: str = "greet", who: str = "Ada", *, token: str = "") -> bytes:
    """A robot call as Bitrix24 posts it (form-encoded, like events)."""
    return encode_form(
        {
            "workflow_id": "664a1b2c3d4e5f.12345678",
            "code": code,
            "document_id": ["crm", "CCrmDocumentDeal", "DEAL_42"],
            "document_type": ["crm", "CCrmDocumentDeal", "DEAL"],
            "event_token": TOKEN,
            "properties": {"who": who},
            "use_subscription": "Y",
            "timeout_duration": "0",
            "ts": "1764360000",
            "auth": {
                "access_token": "acc-in-the-call",
                "expires": "1764363600",
                "expires_in": "3600",
                "scope": "crm,bizproc",
                "domain": HOST,
                "server_endpoint": "https://oauth.bitrix.info/rest/",
                "status": "L",
                "client_endpoint": f"https://{HOST}/rest/",
                "member_id": MEMBER,
                "user_id": "1",
                "refresh_token": "ref-in-the-call",
                "application_token": token or f"app-token-{MEMBER}",
            },
        }
    )


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def settings_of(tmp_path: Path, cert: Path) -> Settings:
    return portal_settings(
        cert,
        f"sqlite:{tmp_path / 'portals.db'}",
        broker_url=f"sqlite:{tmp_path / 'queue.db'}",
        sqlite_poll_s=0.02,
        shutdown_timeout_s=2,
        bizproc=f"{__name__}:Greeter,{__name__}:ARCHIVE",
        events_handler_url=OURS,
    )


@asynccontextmanager
async def running(settings: Settings, fake: FakePortal) -> AsyncIterator[TestClient[Any, Any]]:
    """The ingress (verifying portals) and a worker with Greeter, on one SQLite queue."""
    store = SqliteTokenStore(Path(settings.portal_store.removeprefix("sqlite:")))
    await install(store, fake.rest, MEMBER)
    async with (
        transport_for(settings).publisher("test ingress") as sink,
        PortalClients(settings, resolver=StaticResolver()) as portals,
        Worker(settings, [Greeter], portals=portals),
    ):
        app = create_app(settings, sink, PortalVerifier(store, None))
        async with TestClient(TestServer(app)) as client:
            yield client
    await store.close()


@pytest.fixture(autouse=True)
def _fresh() -> None:
    runs.clear()


async def test_a_robot_call_is_answered_once_with_its_return_values(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    bizproc = FakeBizproc.attach(fake_portal.rest)
    bizproc.waiting(TOKEN)
    settings = settings_of(tmp_path, portal_certificate[0])
    async with running(settings, fake_portal) as client:
        resp = await client.post("/b24/events", data=robot_call(), headers=FORM)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["status"] == "accepted"
        await wait_until(lambda: bizproc.answers, 10, "the answer sent")
        await asyncio.sleep(0.3)  # nothing more comes
    assert runs == ["Ada"]
    assert bizproc.answers == [{"token": TOKEN, "values": {"greeting": "Hello, Ada"}, "log": ""}]
    assert bizproc.count("bizproc.event.send") == 1
    # The queue kept the call without its OAuth pair and application token, with its event token.
    stored = (tmp_path / "queue.db").read_bytes()
    for secret in (b"acc-in-the-call", b"ref-in-the-call", f"app-token-{MEMBER}".encode()):
        assert secret not in stored


async def test_a_failed_send_is_retried_without_running_the_handler_again(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    bizproc = FakeBizproc.attach(fake_portal.rest)
    bizproc.waiting(TOKEN)
    bizproc.fail_sends = 1  # the first bizproc.event.send answers 500
    settings = settings_of(tmp_path, portal_certificate[0])
    async with running(settings, fake_portal) as client:
        resp = await client.post("/b24/events", data=robot_call(who="Grace"), headers=FORM)
        assert resp.status == 200
        await wait_until(lambda: bizproc.answers, 10, "the answer sent on the retry")
        await asyncio.sleep(0.3)
    assert runs == ["Grace"]  # the handler ran once
    assert bizproc.count("bizproc.event.send") == 2
    assert bizproc.answers[0]["values"] == {"greeting": "Hello, Grace"}


async def test_a_send_whose_answer_was_lost_is_not_dead_lettered(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    """The first send reached the workflow but its answer was lost: the retry's ACCESS_DENIED
    (the token is spent) is taken as answered, not as a failure."""
    bizproc = FakeBizproc.attach(fake_portal.rest)
    bizproc.waiting(TOKEN)
    bizproc.lose_answers = 1
    settings = settings_of(tmp_path, portal_certificate[0])
    async with running(settings, fake_portal) as client:
        resp = await client.post("/b24/events", data=robot_call(who="Lin"), headers=FORM)
        assert resp.status == 200
        await wait_until(lambda: bizproc.count("bizproc.event.send") == 2, 10, "the retry")
        await asyncio.sleep(0.3)
        async with transport_for(settings).dead_letters(Greeter.queue) as tool:
            total, _ = await tool.list(10)
    assert runs == ["Lin"]
    assert len(bizproc.answers) == 1
    assert total == 0


async def test_a_dead_lettered_call_tells_its_workflow(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    bizproc = FakeBizproc.attach(fake_portal.rest)
    bizproc.waiting(TOKEN)
    settings = settings_of(tmp_path, portal_certificate[0])
    async with running(settings, fake_portal) as client:
        resp = await client.post("/b24/events", data=robot_call(who="nobody"), headers=FORM)
        assert resp.status == 200
        await wait_until(lambda: bizproc.answers, 10, "the give-up result sent")
        async with transport_for(settings).dead_letters(Greeter.queue) as tool:
            total, letters = await tool.list(10)
    assert runs == ["nobody"]
    assert bizproc.answers == [
        {
            "token": TOKEN,
            "values": {"greeting": ""},
            "log": "The app could not handle this step (rejected).",
        }
    ]
    assert total == 1
    assert letters[0].reason == "rejected"
    assert letters[0].event == "ROBOT.GREET"
    assert letters[0].workflow_told == "error result sent (bizproc.event.send)"
    assert letters[0].error.startswith("Reject: nobody to greet") and TOKEN not in letters[0].error


async def test_a_foreign_or_undeclared_call_is_refused(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    bizproc = FakeBizproc.attach(fake_portal.rest)
    settings = settings_of(tmp_path, portal_certificate[0])
    async with running(settings, fake_portal) as client:
        forged = await client.post(
            "/b24/events", data=robot_call(token="someone-elses-token"), headers=FORM
        )
        assert forged.status == 401
        assert "application_token" in (await forged.json())["error"]
        unknown = await client.post("/b24/events", data=robot_call(code="nope"), headers=FORM)
        assert unknown.status == 400
        assert (await unknown.json())["field"] == "code"
        long_token = robot_call().replace(b"hsyUws1j", b"x" * 600)
        bounded = await client.post("/b24/events", data=long_token, headers=FORM)
        assert bounded.status == 400
        assert (await bounded.json())["field"] == "event_token"
        await asyncio.sleep(0.3)
    assert runs == []
    assert bizproc.answers == []


async def test_declarations_are_registered_then_updated_and_a_dry_run_changes_nothing(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    bizproc = FakeBizproc.attach(fake_portal.rest)
    FakeEvents.attach(fake_portal.rest)  # the reconciler reads event.get first
    settings = settings_of(tmp_path, portal_certificate[0])
    store = SqliteTokenStore(tmp_path / "portals.db")
    record = await install(store, fake_portal.rest, MEMBER)
    bizproc.of(HOST, "robot")["old_robot"] = {"HANDLER": OURS, "NAME": "Old"}
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        from b24queue.portal.sqlite_state import SqliteState

        state = SqliteState(tmp_path / "portals.db")
        reconciler = Reconciler(settings, clients.for_event, state, ())
        dry = await reconciler.reconcile(record, dry_run=True)
        assert dry is not None
        assert ("would add", "ROBOT.GREET", "") in dry.bizproc
        assert "greet" not in bizproc.of(HOST, "robot")
        first = await reconciler.reconcile(record)
        second = await reconciler.reconcile(record)
        await state.close()
        assert portal_event(record).auth.member_id == MEMBER
    await store.close()
    assert first is not None and second is not None
    assert ("add", "ROBOT.GREET", "added") in first.bizproc
    assert ("add", "ACTIVITY.ARCHIVE_DOC", "added") in first.bizproc
    assert ("leave", "ROBOT.OLD_ROBOT", "not declared") in first.bizproc
    assert ("update", "ROBOT.GREET", "updated") in second.bizproc
    assert first.ok and second.ok
    greet = bizproc.of(HOST, "robot")["greet"]
    assert greet["HANDLER"] == OURS
    assert greet["NAME"] == {"en": "Greet", "de": "Grüßen"}
    assert greet["USE_SUBSCRIPTION"] == "Y"
    assert greet["PROPERTIES"]["who"]["Required"] == "Y"
    assert greet["RETURN_PROPERTIES"] == {
        "greeting": {"Name": "Greeting", "Type": "string", "Required": "N", "Multiple": "N"}
    }
    assert bizproc.of(HOST, "activity")["archive_doc"]["USE_SUBSCRIPTION"] == "N"
    assert "old_robot" in bizproc.of(HOST, "robot")  # never deleted
    assert any("add ROBOT.GREET: added" in line for line in describe(HOST, first, dry_run=False))


async def test_a_portal_refusing_registration_is_reported_not_fatal(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    """bizproc.robot.list answering ACCESS_DENIED (not an administrator's token): the robots are
    reported as not registered (the plan not ok), the activities and event bindings still are."""
    bizproc = FakeBizproc.attach(fake_portal.rest)
    bizproc.denied.add("bizproc.robot.list")
    FakeEvents.attach(fake_portal.rest)
    settings = settings_of(tmp_path, portal_certificate[0])
    store = SqliteTokenStore(tmp_path / "portals.db")
    await install(store, fake_portal.rest, MEMBER)
    await store.close()
    lines, ok = await portal_bindings(
        settings, [Greeter], None, dry_run=False, resolver=StaticResolver()
    )
    assert not ok
    assert "  list bizproc.robot.list: ACCESS_DENIED" in lines
    assert "  add ACTIVITY.ARCHIVE_DOC: added" in lines


def test_declarations_load_and_refuse_what_cannot_route() -> None:
    declared = load_declarations([f"{__name__}:Greeter", f"{__name__}:ARCHIVE"])
    assert [d.routing_key for d in declared] == ["ROBOT.GREET", "ACTIVITY.ARCHIVE_DOC"]
    assert Greeter.binding_keys() == ("ROBOT.GREET",)
    with pytest.raises(ValueError, match="routing key"):
        Robot(code="with-dash", name="x")
    with pytest.raises(ValueError, match="property"):
        Robot(code="ok", name="x", properties={"1bad": Property(name="n")})
    assert json.loads(json.dumps(GREET.fields(OURS)))["NAME"]["de"] == "Grüßen"
    typed = Robot(
        code="typed",
        name="t",
        return_properties={
            "ok": Property(name="Ok", type="bool"),
            "n": Property(name="N", type="int"),
            "x": Property(name="X", type="double", multiple=True),
        },
    )
    assert json.loads(answer_of(typed, {"ok": True, "n": "42", "x": [1.5, "2"]})) == {
        "ok": "Y",
        "n": "42",
        "x": [1.5, "2"],
    }
    for wrong, why in (
        ({"n": "4.2"}, "n is a str, not a value of type int"),
        ({"ok": [True]}, "ok is a list"),
        ({"x": ["nan"]}, "x is a str, not a value of type double"),
        ({"n": {"a": 1}}, "n is a dict"),
        ({"other": 1}, "not among its return_properties"),
        ("text", "not a dict"),
    ):
        with pytest.raises(Reject, match=why):
            answer_of(typed, wrong)
    with pytest.raises(ValueError, match="give_up_values"):
        Robot(code="ok", name="x", give_up_values={"missing": "N"})
    sent = sample_call("greet", "tok", ["properties[who]=Ada"])
    assert is_call(sent) and as_event(sent, declared)["event"] == "ROBOT.GREET"
    assert sent["properties"] == {"who": "Ada"}
    with pytest.raises(ConfigError, match="declared twice"):
        Declarations([GREET, Robot(code="GREET", name="other")])


def test_a_robot_consumer_adds_no_event_to_bind(tmp_path: Path, portal_certificate: Any) -> None:
    settings = settings_of(tmp_path, portal_certificate[0])
    assert wanted_events(settings, [Greeter]) == ()  # robots only: accepted, nothing to bind


async def test_portals_bindings_shows_the_robots_to_register(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    bizproc = FakeBizproc.attach(fake_portal.rest)
    FakeEvents.attach(fake_portal.rest)
    settings = settings_of(tmp_path, portal_certificate[0])
    store = SqliteTokenStore(tmp_path / "portals.db")
    await install(store, fake_portal.rest, MEMBER)
    await store.close()
    lines, ok = await portal_bindings(
        settings, [Greeter], None, dry_run=True, resolver=StaticResolver()
    )
    assert ok
    assert "  would add ROBOT.GREET" in lines and "  would add ACTIVITY.ARCHIVE_DOC" in lines
    assert bizproc.of(HOST, "robot") == {}
    lines, ok = await portal_bindings(
        settings, [Greeter], None, dry_run=False, resolver=StaticResolver()
    )
    assert ok and "  add ROBOT.GREET: added" in lines
    assert "greet" in bizproc.of(HOST, "robot")


async def test_a_json_call_is_routed_and_an_event_is_never_taken_for_a_call(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    settings = settings_of(tmp_path, portal_certificate[0])
    call = decode_form(robot_call())
    async with running(settings, fake_portal) as client:
        resp = await client.post("/b24/events", json={**call, "workflow_id": "x" * 65})
        assert resp.status == 400 and (await resp.json())["field"] == "workflow_id"
        # `event` present: an event (here one nobody consumes), whatever else it carries.
        resp = await client.post("/b24/events", json={**call, "event": "ONCRMDEALADD"})
        assert resp.status == 200
    async with transport_for(settings).dead_letters(settings.unrouted) as tool:
        total, letters = await tool.list(10)
    assert total == 1 and letters[0].event == "ONCRMDEALADD"


async def test_a_call_delivered_too_often_tells_its_workflow(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    """The delivery limit (a call whose handler kills the worker each time) dead-letters it
    without running the handler: its workflow is told all the same."""
    bizproc = FakeBizproc.attach(fake_portal.rest)
    bizproc.waiting(TOKEN)
    settings = settings_of(tmp_path, portal_certificate[0])
    store = SqliteTokenStore(tmp_path / "portals.db")
    await install(store, fake_portal.rest, MEMBER)
    payload = as_event(decode_form(robot_call()), load_declarations([f"{__name__}:Greeter"]))
    envelope = envelope_for(Event.from_payload(payload))
    incoming = Incoming(
        body=envelope.body,
        message_id=envelope.message_id,
        routing_key=envelope.routing_key,
        headers=envelope.headers,
        redelivered=True,
    )
    settled: list[Outcome] = []

    class Settles:
        async def settle(self, incoming: Incoming, outcome: Outcome) -> None:
            settled.append(outcome)

    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        consumer = Greeter()
        consumer.portals = clients
        outcome = await give_up(incoming, Greeter.queue, Settles(), 21, consumer=consumer)
    await store.close()
    assert runs == []
    assert outcome.reason == "delivery_limit" and settled == [outcome]
    assert outcome.headers[c.H_WORKFLOW_TOLD] == "error result sent (bizproc.event.send)"
    assert bizproc.answers[0]["log"] == "The app could not handle this step (delivery_limit)."


# 7-8 s (a worker process started, killed and started again): long, run by make faults, keeping
# make test within its ten minutes.
@pytest.mark.long
async def test_a_worker_killed_between_handler_and_send_answers_once(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    """SIGKILL while bizproc.event.send is on its way (held at the fake portal): the call comes
    back to another worker, whose handler runs again (the answer was not kept: at least once)
    and whose send is the one answer the workflow gets."""
    bizproc = FakeBizproc.attach(fake_portal.rest)
    bizproc.waiting(TOKEN)
    gate = asyncio.Event()
    bizproc.hold_next_send = gate
    record = tmp_path / "runs.txt"
    settings = portal_settings(
        portal_certificate[0],
        f"sqlite:{tmp_path / 'portals.db'}",
        broker_url=f"sqlite:{tmp_path / 'queue.db'}",
        bizproc="tests.support.robot_worker:GREET",
    )
    store = SqliteTokenStore(tmp_path / "portals.db")
    await install(store, fake_portal.rest, MEMBER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
    env.update(
        {
            "B24QUEUE_BROKER_URL": settings.broker_url,
            "B24QUEUE_SQLITE_POLL_S": "0.05",
            "B24QUEUE_SHUTDOWN_TIMEOUT_S": "2",
            "B24QUEUE_PORTAL_STORE": settings.portal_store,
            "B24QUEUE_APP_CLIENT_ID": CLIENT_ID,
            "B24QUEUE_APP_CLIENT_SECRET": CLIENT_SECRET,
            "B24QUEUE_OAUTH_URL": OAUTH_URL,
            "B24QUEUE_PORTAL_ALLOW_PRIVATE": "true",
            "B24QUEUE_PORTAL_CA_FILE": str(portal_certificate[0]),
            "B24QT_PORTAL_PORT": str(fake_portal.listen_port),
            "B24QT_RECORD": str(record),
        }
    )

    async def worker(n: int) -> asyncio.subprocess.Process:
        with open(tmp_path / f"worker{n}.log", "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.support.robot_worker", cwd=ROOT, env=env,
                stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        STARTED.append(proc)
        return proc

    await declare_topology(settings, [robot_worker.Greeter])  # its queue, before the call comes
    async with transport_for(settings).publisher("test ingress") as sink:
        app = create_app(settings, sink, PortalVerifier(store, None))
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/b24/events", data=robot_call(), headers=FORM)
            assert resp.status == 200, await resp.text()
    first = await worker(1)
    await wait_until(lambda: bizproc.count("bizproc.event.send") == 1, 30, "the send on its way")
    first.kill()  # SIGKILL: the handler ran, its answer is on the wire, nothing settled
    await first.wait()
    second = await worker(2)
    try:
        await wait_until(lambda: bizproc.answers, 30, "the call answered by the next worker")
        gate.set()  # the first send arrives now: its token is spent, nothing more is answered
        await asyncio.sleep(0.3)
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.wait(), 20)
        await store.close()
    lines = record.read_text().split("\n")[:-1]
    assert [line.split()[0] for line in lines] == ["Ada", "Ada"]  # ran in each worker
    assert len(bizproc.answers) == 1
    assert bizproc.answers[0]["values"] == {"greeting": "Hello, Ada"}


async def test_the_offline_service_registers_the_robots_at_start_and_at_onappupdate(
    tmp_path: Path, fake_portal: FakePortal, portal_certificate: Any
) -> None:
    """`b24queue offline` (on the SQLite queue here) registers the declared robots and
    activities on an installed portal at its start, beside the event bindings, and again at
    the portal's ONAPPUPDATE."""
    bizproc = FakeBizproc.attach(fake_portal.rest)
    events = FakeEvents.attach(fake_portal.rest)
    offline = FakeOffline.attach(fake_portal.rest)
    store = f"sqlite:{tmp_path / 'portals.db'}"
    await installed(store, fake_portal.rest, offline, MEMBER)
    settings = settings_of(tmp_path, portal_certificate[0]).model_copy(
        update={"offline_poll_s": 0.2}
    )
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve_offline(
            settings,
            stop,
            resolver=StaticResolver(),
            metrics=OfflineMetrics(),
            wanted=("ONCRMDEALADD",),
        )
    )
    try:
        await wait_until(
            lambda: (
                "greet" in bizproc.of(HOST, "robot")
                and "archive_doc" in bizproc.of(HOST, "activity")
            ),
            20,
            "the robot and the activity registered",
        )
        # Gone from the portal (an app update, an admin): back at the portal's ONAPPUPDATE, not
        # at the next hourly round.
        del bizproc.of(HOST, "robot")["greet"]
        store_ = SqliteTokenStore(tmp_path / "portals.db")
        async with transport_for(settings).publisher("test ingress") as sink:
            app = create_app(settings, sink, PortalVerifier(store_, None))
            async with TestClient(TestServer(app)) as client:
                update = {
                    "event": "ONAPPUPDATE",
                    "data": {"VERSION": "2", "LANGUAGE_ID": "en"},
                    "ts": "1764360000",
                    "auth": {
                        "domain": HOST,
                        "member_id": MEMBER,
                        "application_token": f"app-token-{MEMBER}",
                    },
                }
                resp = await client.post("/b24/events", json=update)
                assert resp.status == 200, await resp.text()
        await store_.close()
        await wait_until(lambda: "greet" in bizproc.of(HOST, "robot"), 10, "registered again")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert bizproc.of(HOST, "robot")["greet"]["HANDLER"] == OURS
    assert {b.event for b in events.of(HOST)} == {"ONCRMDEALADD"}
