"""Per-portal tokens through the real ingress and RabbitMQ, with both stores (SQLite, Redis),
and two ingress processes sharing the Redis store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from b24queue.auth.install import NOT_CONFIRMED, PortalCallback
from b24queue.auth.portal import PortalVerifier
from b24queue.auth.store import RedisTokenStore, SqliteTokenStore, TokenStore
from b24queue.events.forms import encode_form
from b24queue.ingress.app import create_app
from b24queue.transports.amqp.publisher import AmqpPublisher
from tests.support.fake_portal import CLIENT_ID, FakePortal, StaticResolver
from tests.support.proxy import free_port
from tests.support.rabbitmq import AMQP_URL, Broker

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.broker


def body(
    name: str,
    member: str,
    token: str,
    portal: FakePortal | None,
    *,
    domain: str = "",
    access: str = "good-1",
    endpoint: str | None = None,
) -> bytes:
    domain = domain or f"{member}.portal.test"
    if endpoint is None:
        endpoint = portal.endpoint(domain) if portal else f"https://{domain}/rest/"
    return encode_form(
        {
            "event": name,
            "event_handler_id": "1",
            "data": {"VERSION": "1"},
            "ts": "1764360000",
            "auth": {
                "domain": domain,
                "member_id": member,
                "application_token": token,
                "access_token": access,
                "client_endpoint": endpoint,
            },
        }
    )


@asynccontextmanager
async def portal_ingress(
    broker: Broker,
    store: TokenStore,
    cert: Path,
    resolver: StaticResolver | None = None,
    **extra: Any,
) -> AsyncIterator[TestClient[Any, Any]]:
    values: dict[str, Any] = {
        "app_tokens": "",
        "portal_verification": True,
        "app_client_id": CLIENT_ID,
        "portal_domains": "*.portal.test",
        "portal_allow_private": True,
        "portal_ca_file": str(cert),
        "portal_check_timeout_s": 1.0,
    }
    settings = broker.make_settings(**{**values, **extra})
    async with (
        AmqpPublisher(settings, f"b24queue ingress {settings.exchange}") as publisher,
        PortalCallback(settings, resolver=resolver or StaticResolver()) as check,
    ):
        app = create_app(settings, publisher, PortalVerifier(store, check))
        async with TestClient(TestServer(app)) as client:
            await asyncio.wait_for(publisher.connected.wait(), 15)
            yield client


@asynccontextmanager
async def store_of(kind: str, tmp_path: Path) -> AsyncIterator[TokenStore]:
    if kind == "sqlite":
        store: TokenStore = SqliteTokenStore(tmp_path / "portals.sqlite3")
    else:
        store = RedisTokenStore(
            "redis://127.0.0.1:6379/0", prefix=f"b24queue-test:{uuid.uuid4().hex}:"
        )
    try:
        yield store
    finally:
        for record in await store.all():
            await store.forget(record.member_id)
        await store.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_install_update_uninstall_for_two_portals(
    broker: Broker,
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    kind: str,
) -> None:
    queue = await broker.bind_queue("all", "#")
    async with (
        store_of(kind, tmp_path) as store,
        portal_ingress(broker, store, portal_certificate[0]) as client,
    ):

        async def post(data: bytes) -> int:
            resp = await client.post("/b24/events", data=data, headers=FORM)
            return resp.status

        assert await post(body("ONAPPINSTALL", "alpha", "tok-a", fake_portal)) == 200
        assert await post(body("ONAPPINSTALL", "beta", "tok-b", fake_portal)) == 200
        assert await post(body("ONCRMDEALUPDATE", "alpha", "tok-a", fake_portal)) == 200
        assert await post(body("ONCRMDEALUPDATE", "beta", "tok-b", fake_portal)) == 200
        # Each portal only with its own token; unknown portals not at all.
        assert await post(body("ONCRMDEALUPDATE", "alpha", "tok-b", fake_portal)) == 401
        assert await post(body("ONCRMDEALUPDATE", "gamma", "tok-a", fake_portal)) == 401
        assert await post(body("ONAPPUNINSTALL", "alpha", "tok-a", fake_portal)) == 200
        assert await post(body("ONCRMDEALUPDATE", "alpha", "tok-a", fake_portal)) == 401
        assert await post(body("ONCRMDEALUPDATE", "beta", "tok-b", fake_portal)) == 200
        assert [r.member_id for r in await store.all()] == ["beta"]
    messages = await broker.take(queue, 6)
    assert [m.routing_key for m in messages] == [
        "ONAPPINSTALL",
        "ONAPPINSTALL",
        "ONCRMDEALUPDATE",
        "ONCRMDEALUPDATE",
        "ONAPPUNINSTALL",
        "ONCRMDEALUPDATE",
    ]
    assert await broker.depth(queue) == 0
    assert len(fake_portal.calls) == 2  # one call-back per new install


@pytest.mark.parametrize(
    ("access", "endpoint", "domain"),
    [
        ("wrong-app", None, ""),
        ("expired", None, ""),
        ("error", None, ""),
        ("slow", None, ""),
        ("good-1", "http://forged.portal.test:{port}/rest/", ""),
        ("good-1", "https://elsewhere.portal.test:{port}/rest/", ""),
        ("good-1", None, "forged.evil.example"),
    ],
)
async def test_forged_installs_get_401_and_change_nothing(
    broker: Broker,
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    access: str,
    endpoint: str | None,
    domain: str,
) -> None:
    queue = await broker.bind_queue("all", "#")
    if endpoint is not None:
        endpoint = endpoint.format(port=fake_portal.port)
    async with (
        store_of("sqlite", tmp_path) as store,
        portal_ingress(broker, store, portal_certificate[0]) as client,
    ):
        data = body(
            "ONAPPINSTALL",
            "forged",
            "tok-f",
            fake_portal,
            access=access,
            endpoint=endpoint,
            domain=domain,
        )
        resp = await client.post("/b24/events", data=data, headers=FORM)
        assert resp.status == 401, await resp.text()
        assert "tok-f" not in await resp.text()
        assert await store.all() == []
    assert await broker.depth(queue) == 0


async def test_a_portal_on_a_private_address_is_refused(
    broker: Broker, fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    queue = await broker.bind_queue("all", "#")
    async with (
        store_of("sqlite", tmp_path) as store,
        portal_ingress(broker, store, portal_certificate[0], portal_allow_private=False) as client,
    ):
        resp = await client.post(
            "/b24/events", data=body("ONAPPINSTALL", "inside", "t", fake_portal), headers=FORM
        )
        assert resp.status == 401
        assert await resp.json() == {"error": NOT_CONFIRMED}  # the reason is logged, not told
        assert await store.all() == []
    assert await broker.depth(queue) == 0
    assert fake_portal.calls == []


@pytest.mark.parametrize(
    ("endpoint", "closed_port"),
    [
        ("https://{domain}:8443/rest/", False),
        ("https://{domain}:0/rest/", False),
        ("https://{domain}/other/", False),
        ("https://{domain}/rest/", True),  # a port scan: nothing listens there
    ],
)
async def test_a_refused_install_call_back_tells_the_caller_nothing_more(
    broker: Broker,
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    endpoint: str,
    closed_port: bool,
) -> None:
    port = free_port()  # closed again: connecting there is refused
    resolver = StaticResolver(ports={443: port}) if closed_port else None
    async with (
        store_of("sqlite", tmp_path) as store,
        portal_ingress(broker, store, portal_certificate[0], resolver) as client,
    ):
        data = body(
            "ONAPPINSTALL", "scan", "t", None, endpoint=endpoint.format(domain="scan.portal.test")
        )
        resp = await client.post("/b24/events", data=data, headers=FORM)
        text = await resp.text()
        assert resp.status == 401
        assert await resp.json() == {"error": NOT_CONFIRMED}
        for leak in ("127.0.0.1", str(port), "8443", "Errno", "Connect", "other"):
            assert leak not in text
        assert await store.all() == []
    assert fake_portal.calls == []


async def test_an_install_flood_does_not_make_a_real_install_wait(
    broker: Broker, fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    async with (
        store_of("sqlite", tmp_path) as store,
        portal_ingress(
            broker,
            store,
            portal_certificate[0],
            portal_check_concurrency=1,
            portal_check_timeout_s=15.0,
        ) as client,
    ):

        async def post(data: bytes) -> aiohttp.ClientResponse:
            return await client.post("/b24/events", data=data, headers=FORM)

        held = asyncio.create_task(
            post(body("ONAPPINSTALL", "slow", "s", fake_portal, access="hold"))
        )
        await fake_portal.wait_for_calls(1)  # the only slot is taken, held by the portal
        resp = await post(body("ONAPPINSTALL", "real", "r", fake_portal))
        # Answered while the held call-back still waits: refused at once, not queued behind it.
        assert not held.done()
        assert resp.status == 401 and await resp.json() == {"error": NOT_CONFIRMED}
        fake_portal.release.set()
        assert (await held).status == 200
        # Bitrix24 does not resend an install; the portal's admin reinstalls, and that goes through.
        assert (await post(body("ONAPPINSTALL", "real", "r", fake_portal))).status == 200
        assert sorted(r.member_id for r in await store.all()) == ["real", "slow"]
    assert [c["token"] for c in fake_portal.calls] == ["hold", "good-1"]


async def test_reinstall_with_a_new_token_and_a_replayed_install(
    broker: Broker, fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    async with (
        store_of("sqlite", tmp_path) as store,
        portal_ingress(broker, store, portal_certificate[0]) as client,
    ):

        async def post(data: bytes) -> int:
            return (await client.post("/b24/events", data=data, headers=FORM)).status

        assert await post(body("ONAPPINSTALL", "p", "first", fake_portal)) == 200
        # Replayed install with the known (say, stolen) token: accepted as a repeat, no change.
        assert await post(body("ONAPPINSTALL", "p", "first", fake_portal, access="expired")) == 200
        # A new token the portal does not confirm: refused, the old one stays.
        assert await post(body("ONAPPINSTALL", "p", "second", fake_portal, access="expired")) == 401
        assert await post(body("ONCRMDEALADD", "p", "first", fake_portal)) == 200
        # A real reinstall (the portal confirms): the new token replaces the old one.
        assert await post(body("ONAPPINSTALL", "p", "second", fake_portal, access="good-2")) == 200
        assert await post(body("ONCRMDEALADD", "p", "first", fake_portal)) == 401
        assert await post(body("ONCRMDEALADD", "p", "second", fake_portal)) == 200


async def test_two_ingress_processes_share_the_redis_store(broker: Broker, tmp_path: Path) -> None:
    prefix_store = "redis://127.0.0.1:6379/0"
    ports = [free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("B24QUEUE_")}
    env.update(
        {
            "B24QUEUE_AMQP_URL": AMQP_URL,
            "B24QUEUE_EXCHANGE": broker.settings.exchange,
            "B24QUEUE_UNROUTED": broker.settings.unrouted,
            "B24QUEUE_PORTAL_VERIFICATION": "true",
            "B24QUEUE_PORTAL_CALLBACK": "false",  # trust on first install: this test is the sharing
            "B24QUEUE_PORTAL_STORE": prefix_store,
            "B24QUEUE_SPOOL_ENABLED": "false",
        }
    )
    member = f"shared_{uuid.uuid4().hex[:8]}"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "b24queue",
            "ingress",
            "--host",
            "127.0.0.1",
            "--port",
            str(p),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for p in ports
    ]
    store = RedisTokenStore(prefix_store)
    try:
        async with aiohttp.ClientSession() as session:
            for p in ports:
                for _ in range(100):
                    try:
                        async with session.get(f"http://127.0.0.1:{p}/readyz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)

            async def post(port: int, data: bytes) -> int:
                async with session.post(
                    f"http://127.0.0.1:{port}/b24/events", data=data, headers=FORM
                ) as r:
                    return r.status

            assert await post(ports[0], body("ONAPPINSTALL", member, "tok-s", None)) == 200
            # The other process knows the portal at once.
            assert await post(ports[1], body("ONCRMDEALADD", member, "tok-s", None)) == 200
            assert await post(ports[1], body("ONCRMDEALADD", member, "tok-x", None)) == 401
            assert await post(ports[1], body("ONAPPUNINSTALL", member, "tok-s", None)) == 200
            assert await post(ports[0], body("ONCRMDEALADD", member, "tok-s", None)) == 401
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 20)
        await store.forget(member)
        await store.close()
    assert await broker.depth(broker.settings.unrouted) == 3


async def test_portals_cli_lists_without_tokens_and_forgets(tmp_path: Path) -> None:
    path = tmp_path / "portals.sqlite3"
    store = SqliteTokenStore(path)
    from b24queue.auth.store import PortalRecord

    await store.remember(
        PortalRecord("m-cli", "acme.bitrix24.com", "very-secret-token", refresh_token="ref-secret")
    )
    await store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("B24QUEUE_")}
    env["B24QUEUE_PORTAL_STORE"] = f"sqlite:{path}"

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "b24queue",
            "portals",
            *args,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await cli("list")
    assert code == 0 and "m-cli  acme.bitrix24.com" in out and "very-secret" not in out
    assert "(refreshable)" in out and "ref-secret" not in out
    code, out = await cli("list", "--json")
    assert code == 0 and "very-secret" not in out and "ref-secret" not in out
    assert json.loads(out)[0]["refreshable"] is True
    assert (await cli("forget", "m-cli"))[0] == 0
    assert (await cli("forget", "m-cli"))[0] == 1
    code, out = await cli("list")
    assert "no portals installed yet" in out
