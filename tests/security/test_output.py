"""Issue 36, items 4, 5 and 8: what b24queue keeps and prints never holds a secret, nor a
terminal escape from someone else's data.

- 4: an OAuth server whose error quotes the request (and so the client secret), and a handler
  error quoting the process's own secrets, reach neither a dead letter nor `dlq list`.
- 5: an escape sequence in event data, quoted by a handler's error, reaches `dlq list` escaped.
- 8: `send --url` with a password, a `kafka://user:password@` URL, a management URL with a
  password and an invalid B24QUEUE_PORTAL_STORE never show the password; `send` takes its token
  from B24QUEUE_SEND_TOKEN or --token-file, and warns about --token.

The CLI runs as a user runs it (a subprocess); queues are SQLite files (the cheapest real
transport), the portal the fake one (tests/support/fake_portal.py)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from b24queue import Event, EventConsumer, Reject
from b24queue.auth.store import SqliteTokenStore
from b24queue.auth.tokens import StaticTokens
from b24queue.events.envelope import envelope_for
from b24queue.ingress.app import create_app
from b24queue.portal.clients import PortalClients
from b24queue.settings import Settings, load_settings
from b24queue.transports import transport_for
from b24queue.worker import Worker
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.fake_rest import CLIENT_SECRET
from tests.support.portal_setup import deal_event, install, portal_settings
from tests.support.processes import ROOT
from tests.support.samples import SAMPLE_TOKEN
from tests.support.wait import wait_until

SECRET = "pa55-Wq7v-secret"  # a password, in URLs
ESC = "\x1b"


async def run(env: dict[str, str], *args: str) -> tuple[int, bytes, bytes]:
    """`python -m b24queue ARGS` with this environment (and no other B24QUEUE_* variable)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "b24queue", *args, cwd=ROOT, env={**clean, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


def consumer(queue: str, handle: Any, **attrs: Any) -> type[EventConsumer]:
    body = {"queue": queue, "events": ("#",), "handle": handle, "max_attempts": 1, **attrs}
    return type("C", (EventConsumer,), body)


async def dead_letter(settings: Settings, queue: str) -> None:
    async with transport_for(settings).dead_letters(queue) as dlq:

        async def one() -> bool:
            return await dlq.count() == 1

        await wait_until(one, 30, f"a dead letter in {queue}")


def stored(db: Path) -> bytes:
    """Every byte of a SQLite queue: the database and its write-ahead log."""
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


async def test_no_secret_of_ours_reaches_a_dead_letter_or_dlq_list(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rest = fake_portal.rest

    def quoting_oauth(query: Any) -> web.Response:  # an OAuth server that quotes the request
        said = f"client_secret {query.get('client_secret')} is not valid for this client"
        answer = {"error": "invalid_client", "error_description": said}
        return web.json_response(answer, status=401)

    monkeypatch.setattr(rest, "_refresh", quoting_oauth)
    db = tmp_path / "queue.sqlite3"
    store_path = tmp_path / "portals.sqlite3"
    settings = portal_settings(
        portal_certificate[0],
        f"sqlite:{store_path}",
        broker_url=f"sqlite:{db}",
        sqlite_poll_s=0.02,
        app_tokens=SAMPLE_TOKEN,
    )
    store = SqliteTokenStore(store_path)
    record = await install(store, rest, "m1")
    rest.expire(record.access_token)  # the call refreshes: the OAuth server answers the error
    await store.close()

    async def call_portal(self: EventConsumer, event: Event) -> None:
        await self.portal(event).call("crm.deal.get", {"id": 1})

    async def quote_settings(self: EventConsumer, event: Event) -> None:
        raise ValueError(f"request failed: secret {CLIENT_SECRET} token {SAMPLE_TOKEN}")

    classes = [consumer("calls", call_portal), consumer("quotes", quote_settings)]
    async with (
        PortalClients(settings, resolver=StaticResolver()) as portals,
        Worker(settings, classes, portals=portals),
        transport_for(settings).publisher("test") as sink,
    ):
        await sink.publish(envelope_for(deal_event("m1", 1)))
        await dead_letter(settings, "calls")
        await dead_letter(settings, "quotes")

    assert CLIENT_SECRET.encode() not in stored(db)
    assert SAMPLE_TOKEN.encode() not in stored(db)
    env = {"B24QUEUE_BROKER_URL": f"sqlite:{db}"}
    for queue in ("calls", "quotes"):
        for args in (("dlq", "list", queue), ("dlq", "list", queue, "--json")):
            code, out, err = await run(env, *args)
            assert code == 0, err
            assert CLIENT_SECRET.encode() not in out + err and SAMPLE_TOKEN.encode() not in out
            assert b"***" in out
    code, out, _ = await run(env, "dlq", "list", "calls")
    assert b"invalid_client" in out  # the error is shown, less the secret


async def test_an_escape_sequence_in_event_data_reaches_dlq_list_escaped(tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite3"
    settings = load_settings(broker_url=f"sqlite:{db}", sqlite_poll_s=0.02, app_tokens=SAMPLE_TOKEN)
    # Retitle the terminal, clear it, an 8-bit CSI, a right-to-left override, a forged line.
    hostile = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202etxt.exe\nevent=FORGED"

    async def reject(self: EventConsumer, event: Event) -> None:
        raise Reject(f"bad title {event.data['FIELDS']['TITLE']}")

    async with (
        Worker(settings, [consumer("titles", reject)]),
        transport_for(settings).publisher("ingress") as sink,
    ):
        app = create_app(settings, sink, StaticTokens(settings.app_tokens))
        async with TestClient(TestServer(app)) as client:
            form = {
                "event": "ONCRMDEALADD",
                "data[FIELDS][TITLE]": hostile,
                "auth[domain]": "acme.bitrix24.com",
                "auth[member_id]": "a" * 32,
                "auth[application_token]": SAMPLE_TOKEN,
            }
            resp = await client.post("/b24/events", data=form)
            assert resp.status == 200, await resp.text()
        await dead_letter(settings, "titles")

    env = {"B24QUEUE_BROKER_URL": f"sqlite:{db}"}
    code, out, err = await run(env, "dlq", "list", "titles")
    assert code == 0, err
    text = out.decode()
    for raw in (ESC, "\x07", "\x9b", "\u202e"):
        assert raw not in text, (raw, text)
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202etxt.exe\\x0aevent=FORGED" in text
    assert not any(line.startswith("event=") for line in text.splitlines())
    code, out, err = await run(env, "dlq", "list", "titles", "--json")
    assert code == 0 and ESC.encode() not in out and b"\\u001b]0;owned" in out, err


async def test_send_never_shows_the_password_of_its_url() -> None:
    for url in (
        f"http://user:{SECRET}@127.0.0.1:1/b24/events",  # nothing listens there
        f"http://user:{SECRET}@127.0.0.1/b24/events",  # urllib reads the password as a port
        f"ftp://user:{SECRET}@127.0.0.1/b24/events",  # not http(s): refused
    ):
        code, out, err = await run({}, "send", "ONCRMDEALADD", "--url", url)
        assert code == 1, (url, out, err)
        assert SECRET.encode() not in out + err, (url, err)
        assert b"user:***@127.0.0.1" in err, err


@asynccontextmanager
async def sqlite_ingress(tmp_path: Path) -> AsyncIterator[str]:
    """The real ingress app on a SQLite queue, accepting SAMPLE_TOKEN: its events URL."""
    settings = load_settings(broker_url=f"sqlite:{tmp_path / 'q.sqlite3'}", app_tokens=SAMPLE_TOKEN)
    async with transport_for(settings).publisher("ingress") as sink:
        app = create_app(settings, sink, StaticTokens(settings.app_tokens))
        async with TestClient(TestServer(app)) as client:
            yield str(client.make_url("/b24/events"))


async def test_send_takes_its_token_from_the_environment_or_a_file(tmp_path: Path) -> None:
    code, out, _ = await run({}, "send", "--help")
    help_text = " ".join(out.decode().split())
    assert "B24QUEUE_SEND_TOKEN" in help_text and "--token-file" in help_text
    assert "visible to other users" in help_text
    token_file = tmp_path / "token"
    token_file.write_text(SAMPLE_TOKEN + "\n")
    async with sqlite_ingress(tmp_path) as url:
        send = ("send", "ONCRMDEALADD", "--url", url)
        code, out, err = await run({"B24QUEUE_SEND_TOKEN": SAMPLE_TOKEN}, *send)
        assert (code, out[:4]) == (0, b"200 "), (out, err)
        code, out, err = await run({}, *send, "--token-file", str(token_file))
        assert (code, out[:4]) == (0, b"200 "), (out, err)
        assert b"--token is visible" not in err
        code, out, err = await run({}, *send, "--token", SAMPLE_TOKEN)  # still works, warned
        assert (code, out[:4]) == (0, b"200 "), (out, err)
        assert b"WARNING" in err and b"--token is visible to other users" in err
        code, out, err = await run({}, *send, "--token-file", str(tmp_path / "none"))
        assert code == 2 and b"--token-file" in err, err


async def test_a_kafka_url_with_a_password_is_refused_without_showing_it() -> None:
    env = {
        "B24QUEUE_BROKER_URL": f"kafka://app:{SECRET}@127.0.0.1:1",
        "B24QUEUE_CONNECT_TIMEOUT_S": "1",
    }
    code, out, err = await run(env, "status")
    assert SECRET.encode() not in out + err, err
    assert code == 2 and b"B24QUEUE_BROKER_URL" in err and b"SASL" in err, err


async def test_a_management_url_with_a_password_is_never_shown() -> None:
    env = {"B24QUEUE_MANAGEMENT_URL": f"http://admin:{SECRET}@127.0.0.1:1"}
    code, out, err = await run(env, "status")
    assert code == 3, err
    assert SECRET.encode() not in out + err and b"http://admin:***@127.0.0.1:1" in err, err


async def test_an_invalid_portal_store_is_not_echoed() -> None:
    env = {"B24QUEUE_PORTAL_STORE": f"rediss//:{SECRET}@cache.internal:6379/0"}  # a typo
    code, out, err = await run(env, "portals", "list")
    assert SECRET.encode() not in out + err, err
    assert code == 2 and b"B24QUEUE_PORTAL_STORE" in err, err
