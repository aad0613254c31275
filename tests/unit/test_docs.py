"""The documentation stays true: every setting is on the configuration page and every setting a
page names exists; the README stays a front door; every example a page shows is a file under
docs/examples that runs here (the tour's consumer end to end, on the SQLite transport, through the
commands the tour shows); no file of the repository cites a document outside it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from b24queue import Event
from b24queue.settings import ENV_PREFIX, Settings
from b24queue.testing import make_call, make_event, run_handler, run_message
from docs.examples import (
    consumers,
    idempotent,
    portal_call,
    publishing,
    robot,
    testing_tour,
    tour,
    typed_events,
    typed_own,
)
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.portal_setup import deal_event, domain_of, install, portal_settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))
SETTING = re.compile(rf"\b{ENV_PREFIX}[A-Z0-9_]*[A-Z0-9]\b")
SNIPPET = re.compile(r'--8<--\s+"([^"]+)"')
FENCED_PYTHON = re.compile(r"```python\n(.*?)```", re.S)

# Every example file, and the test below that runs it.
RUN_BY = {
    "tour.py": "test_the_tour_end_to_end_on_sqlite",
    "testing_tour.py": "test_the_testing_example",
    "consumers.py": "test_the_consumer_example",
    "idempotent.py": "test_the_idempotency_example",
    "portal_call.py": "test_the_portal_example",
    "robot.py": "test_the_robot_example",
    "publishing.py": "test_the_publishing_example",
    "typed_events.py": "test_the_typed_events_example",
    "typed_own.py": "test_the_own_model_example",
}


def env_names() -> set[str]:
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def test_every_setting_is_on_the_configuration_page() -> None:
    page = (DOCS / "configuration.md").read_text()
    missing = sorted(name for name in env_names() if name not in SETTING.findall(page))
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_setting_named_is_a_real_one(path: Path) -> None:
    stale = sorted(set(SETTING.findall(path.read_text())) - env_names())
    assert not stale, f"{path.relative_to(ROOT)} names settings that do not exist: {stale}"


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300: move it to docs/)"
    for link in re.findall(r"\]\((docs/[^)#]+)", README.read_text()):
        assert (ROOT / link).is_file(), f"README.md links to {link}, which does not exist"


def test_the_readme_shows_the_example_files_as_they_are() -> None:
    blocks = FENCED_PYTHON.findall(README.read_text())
    assert blocks, "the tour's code is gone from README.md"
    files = {p.read_text() for p in EXAMPLES.glob("*.py")}
    for block in blocks:
        assert block in files, f"README.md shows code that is no file of docs/examples:\n{block}"


def test_every_example_is_shown_and_run() -> None:
    shown = {
        (ROOT / target).resolve() for page in PAGES for target in SNIPPET.findall(page.read_text())
    }
    for target in shown:
        assert target.is_file(), f"a page includes {target}, which does not exist"
    examples = {p for p in EXAMPLES.glob("*.py") if p.name != "__init__.py"}
    assert {p.resolve() for p in examples} <= shown, "an example no page shows"
    assert {p.name for p in examples} == set(RUN_BY), "an example no test runs (RUN_BY)"
    tests = {name for name in globals() if name.startswith("test_")}
    assert set(RUN_BY.values()) <= tests


def test_no_file_cites_a_document_outside_the_repository() -> None:
    outside = ("DESIGN" + ".md", "TRANSPORTS" + ".md", "RABBITMQ-NOTES" + ".md", "../" + "shared")
    cited = []
    for folder in ("b24queue", "tests", "bench", "examples", "docs", "scripts", "rabbitmq"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".md", ".sh", ".conf", ".yml", ".json"}:
                text = path.read_text(errors="replace")
                cited += [f"{path.relative_to(ROOT)}: {o}" for o in outside if o in text]
    for name in ("pyproject.toml", "Makefile", "README.md", "mkdocs.yml"):
        text = (ROOT / name).read_text()
        cited += [f"{name}: {o}" for o in outside if o in text]
    assert not cited


async def test_the_testing_example() -> None:
    await testing_tour.test_deal_sync()


async def test_the_consumer_example() -> None:
    feed = consumers.ProductFeed()
    await feed.on_start()
    product = make_event("CATALOG.PRODUCT.ON.UPDATE", {"FIELDS": {"ID": "5"}})
    assert (await run_handler(feed, product)).acked
    not_yet = await run_handler(feed, make_event("CATALOG.PRODUCT.ON.UPDATE", {}))
    assert not_yet.retried and not_yet.delay_s == 60  # asked for 30 s: the next level up
    await feed.on_stop()
    assert feed.handled == 1
    assert consumers.ProductFeed.binding_keys() == ("CATALOG.PRODUCT.ON.*",)


async def test_the_idempotency_example() -> None:
    event = make_event("ONCRMDEALADD", {"FIELDS": {"ID": "7"}})
    first = await run_handler(idempotent.DealSync(), event, message_id="m-1")
    again = await run_handler(idempotent.DealSync(), event, message_id="m-1")
    assert first.acked and first.reason is None
    assert again.acked and again.reason == "duplicate"


async def test_the_portal_example(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from b24queue.auth.store import SqliteTokenStore
    from b24queue.portal.clients import PortalClients

    store = SqliteTokenStore(tmp_path / "portals.db")
    await install(store, fake_portal.rest, "m1")
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}")
    consumer = portal_call.DealContacts()
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        consumer.portals = clients
        assert (await run_handler(consumer, deal_event("m1", 42))).acked
        gone = await run_handler(consumer, deal_event("m1", 999))
        assert gone.dead_lettered and gone.reason == "rejected"
    assert fake_portal.rest.deal_gets == ["42"]
    assert [m for _, m, _ in fake_portal.rest.served].count("crm.deal.list") == 3  # 120 deals
    await store.close()


async def test_the_robot_example(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from b24queue.auth.store import SqliteTokenStore
    from b24queue.portal.clients import PortalClients
    from tests.support.fake_bizproc import FakeBizproc

    bizproc = FakeBizproc.attach(fake_portal.rest)
    bizproc.waiting("t-1|A1_2_3|x")
    store = SqliteTokenStore(tmp_path / "portals.db")
    await install(store, fake_portal.rest, "m1")
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}")
    call = make_call(
        robot.GREET,
        {"who": "Ada"},
        event_token="t-1|A1_2_3|x",
        domain=domain_of("m1"),
        member_id="m1",
        application_token="app-token-m1",
    )
    consumer = robot.Greeter()
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        consumer.portals = clients
        assert (await run_handler(consumer, call)).acked
    await store.close()
    assert robot.Greeter.binding_keys() == ("ROBOT.GREET",)
    assert bizproc.logs == [("t-1|A1_2_3|x", "greeting Ada")]
    assert bizproc.answers == [
        {"token": "t-1|A1_2_3|x", "values": {"greeting": "Hello, Ada"}, "log": ""}
    ]


async def test_the_typed_events_example(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from b24queue.auth.store import SqliteTokenStore
    from b24queue.portal.clients import PortalClients
    from tests.support.doc_events import doc_samples

    changes = typed_events.DealChanges()
    assert (await run_handler(changes, deal_event("m1", 42))).acked
    assert (await run_handler(changes, deal_event("m1", 0))).reason == "rejected"
    no_id = make_event("ONCRMDEALUPDATE", {"FIELDS": {"TITLE": "x"}})
    assert (await run_handler(changes, no_id)).reason == "model_mismatch"
    audit = typed_events.DealAudit()
    for name in typed_events.DealAudit.events:
        assert (await run_handler(audit, make_event(name, {"FIELDS": {"ID": "1"}}))).acked

    # The bot answers through the portal the event came from, with that portal's credentials.
    answers: list[dict[str, Any]] = []

    async def imbot(host: str, method: str, params: dict[str, Any]) -> Any:
        if method != "imbot.message.add":
            return None
        answers.append(params)
        return 200, {"result": 1}

    fake_portal.rest.extensions.append(imbot)
    store = SqliteTokenStore(tmp_path / "portals.db")
    await install(store, fake_portal.rest, "m1")
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'portals.db'}")
    documented = dict(doc_samples())["chat-bots.outdated.messages.events.on-imbot-message-add"]
    message = {**documented["payload"], "auth": deal_event("m1", 1).payload["auth"]}
    bot = typed_events.EchoBot()
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        bot.portals = clients
        assert (await run_handler(bot, Event.from_payload(message))).acked
    assert answers == [{"BOT_ID": "567", "DIALOG_ID": "27", "MESSAGE": "You wrote: Hello"}]
    await store.close()


def test_the_own_model_example() -> None:
    from b24queue.events.event import model_for
    from tests.support.doc_events import doc_samples

    documented = dict(doc_samples())["booking.booking.events.on-booking-add"]["payload"]
    booking = Event.from_payload(documented).typed()
    assert isinstance(booking, typed_own.BookingAdded) and booking.id == documented["data"]["ID"]
    assert model_for("ONBOOKINGADD") is typed_own.BookingAdded
    assert typed_own.Bookings.event_model is typed_own.BookingAdded
    typed_own.Bookings.check()


# The tour end to end: the commands it shows, on the embedded queue in a temporary folder.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for(what: str, check: object, log: Path, timeout_s: float = 30) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s} s; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture
def tour_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
    port = _free_port()
    env.update(
        PYTHONPATH=str(ROOT),
        B24QUEUE_BROKER_URL=f"sqlite:{tmp_path / 'queue.sqlite3'}",
        B24QUEUE_PORTAL_STORE=f"sqlite:{tmp_path / 'portals.sqlite3'}",
        B24QUEUE_APP_TOKENS="docs-tour-token",
        B24QUEUE_SEND_TOKEN="docs-tour-token",
        B24QUEUE_SQLITE_POLL_S="0.02",
        B24QUEUE_HTTP_HOST="127.0.0.1",
        B24QUEUE_HTTP_PORT=str(port),
    )
    return env


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _b24queue(*args: str, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "b24queue", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        timeout=60,
        check=False,
    )
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    return out


def test_the_tour_end_to_end_on_sqlite(
    tour_env: dict[str, str], processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    worker_log, ingress_log = tmp_path / "worker.log", tmp_path / "ingress.log"
    consumer = f"{tour.__name__}:{tour.DealSync.__name__}"  # docs.examples.tour:DealSync
    for args, log in (["worker", consumer], worker_log), (["ingress"], ingress_log):
        with log.open("wb") as out:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "b24queue", *args],
                    env=tour_env,
                    cwd=tmp_path,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    url = f"http://127.0.0.1:{tour_env['B24QUEUE_HTTP_PORT']}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    _wait_for("the ingress ready", ready, ingress_log)
    _wait_for("the worker started", lambda: "retry delays" in worker_log.read_text(), worker_log)
    for deal_id in ("42", "x", "13"):
        sent = _b24queue(
            "send",
            "ONCRMDEALADD",
            "--url",
            f"{url}/b24/events",
            "--field",
            f"data[FIELDS][ID]={deal_id}",
            env=tour_env,
            cwd=tmp_path,
        )
        assert "200" in sent and "accepted" in sent

    def settled() -> bool:
        text = worker_log.read_text()
        return text.count("outcome=ack") == 2 and "outcome=dead_letter" in text

    _wait_for("42 and 13 acked, x dead-lettered", settled, worker_log)
    assert worker_log.read_text().count("outcome=retry") == 2  # 13: twice, then acked
    dead = _b24queue("dlq", "list", "deal-sync", env=tour_env, cwd=tmp_path)
    assert "rejected" in dead and "no deal id" in dead


async def test_the_publishing_example(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from b24queue.auth.store import SqliteTokenStore
    from b24queue.portal.clients import PortalClients
    from b24queue.transports import transport_for

    store = SqliteTokenStore(tmp_path / "portals.db")
    await install(store, fake_portal.rest, "m1")
    settings = portal_settings(
        portal_certificate[0],
        f"sqlite:{tmp_path / 'portals.db'}",
        broker_url=f"sqlite:{tmp_path / 'queue.sqlite3'}",
    )
    outcome = await run_handler(publishing.DealSync(), deal_event("m1", 42), message_id="d-1")
    [message] = outcome.published
    assert message.routing_key == "APP.DEAL.SYNC_CONTACTS"
    # The next consumer calls the deal event's portal with the message alone.
    contacts = publishing.ContactSync()
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        contacts.portals = clients
        assert (await run_message(contacts, message)).acked
    # From application code: durable in the queue (nobody binds it yet: the unrouted queue).
    first = await publishing.recheck_from_a_view(settings, deal_event("m1", 42), "42")
    again = await publishing.recheck_from_a_view(settings, deal_event("m1", 42), "42")
    assert first == again
    async with transport_for(settings).dead_letters(settings.unrouted) as unrouted:
        total, letters = await unrouted.list(10)
    assert total == 2 and {x.message_id for x in letters} == {first}
