"""The machine's RabbitMQ for tests: every test gets its own exchanges and queues (a unique
prefix) and its own named connections, and everything it declared is deleted afterwards; the
management API; `b24queue` processes on a test's slice; the real ingress app on the real
publisher."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp.test_utils import TestClient, TestServer

from b24queue.auth.tokens import StaticTokens
from b24queue.ingress.app import create_app
from b24queue.settings import Settings, load_settings
from b24queue.transports.amqp.layout import SHARDS
from b24queue.transports.amqp.publisher import AmqpPublisher
from b24queue.transports.amqp.topology import declare_exchanges
from tests.support.processes import ROOT
from tests.support.samples import SAMPLE_TOKEN
from tests.support.wait import wait_until

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
MGMT_URL = "http://127.0.0.1:15672"


class Management:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def get(self, path: str) -> Any:
        async with self.session.get(MGMT_URL + path) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def delete(self, path: str) -> None:
        async with self.session.delete(MGMT_URL + path) as resp:
            if resp.status not in (204, 404):
                resp.raise_for_status()

    async def connections_named(self, fragment: str) -> list[dict[str, Any]]:
        found = await self.get("/api/connections")
        return [
            c
            for c in found
            if fragment in (c.get("client_properties") or {}).get("connection_name", "")
        ]

    async def close_connections(self, fragment: str) -> int:
        conns = await self.connections_named(fragment)
        for c in conns:
            await self.delete(f"/api/connections/{quote(c['name'], safe='')}")
        return len(conns)


class Broker:
    """One test's slice of the real broker."""

    def __init__(self, prefix: str, connection: AbstractRobustConnection, mgmt: Management):
        self.prefix = prefix
        self.connection = connection
        self.mgmt = mgmt
        self.settings = self.make_settings()

    def make_settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": AMQP_URL,
            "exchange": f"{self.prefix}.events",
            "unrouted": f"{self.prefix}.unrouted",
            "app_tokens": SAMPLE_TOKEN,
            "publish_timeout_s": 3.0,
            "reconnect_interval_s": 0.2,
            "connect_timeout_s": 5.0,
            "shutdown_timeout_s": 10.0,
        }
        values.update(overrides)
        return load_settings(**values)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    async def bind_queue(self, suffix: str, *keys: str) -> str:
        """A plain queue bound to the test's events exchange, for looking at what arrives."""
        name = self.name(suffix)
        async with self.connection.channel() as channel:
            exchange = await declare_exchanges(channel, self.settings)
            queue = await channel.declare_queue(name, durable=True)
            for key in keys:
                await queue.bind(exchange, routing_key=key)
        return name

    async def waiting_in(self, queue: str) -> list[str]:
        """`queue` and, for a fair consumer queue, its shards (where its events wait)."""
        names = [queue]
        for i in range(SHARDS):
            try:
                async with self.connection.channel() as channel:
                    await channel.declare_queue(f"{queue}.s{i}", passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                break  # not a fair queue (its shards are made together)
            names.append(f"{queue}.s{i}")
        return names

    async def depth(self, queue: str) -> int:
        """Messages ready in `queue` and, for a fair consumer queue, in its shards."""
        total = 0
        for name in await self.waiting_in(queue):
            async with self.connection.channel() as channel:
                declared = await channel.declare_queue(name, passive=True)
                total += int(declared.declaration_result.message_count or 0)
        return total

    async def take(
        self, queue: str, count: int, timeout_s: float = 15.0
    ) -> list[AbstractIncomingMessage]:
        """Consume and ack `count` messages from a queue, and a fair queue's shards (fails if
        they don't come in time)."""
        got: list[AbstractIncomingMessage] = []
        names = await self.waiting_in(queue)
        async with self.connection.channel() as channel:
            queues = [await channel.declare_queue(name, passive=True) for name in names]

            async def fetch() -> bool:
                for q in queues:
                    while len(got) < count:
                        message = await q.get(no_ack=False, fail=False)
                        if message is None:
                            break
                        await message.ack()
                        got.append(message)
                return len(got) >= count

            await wait_until(fetch, timeout_s, f"{count} messages in {queue}")
        return got

    async def publish_raw(self, queue: str, body: bytes, **props: Any) -> None:
        async with self.connection.channel() as channel:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props),
                routing_key=queue,
            )

    async def cleanup(self) -> None:
        vhost = "%2F"
        for kind in ("queues", "exchanges", "policies"):
            for item in await self.mgmt.get(f"/api/{kind}/{vhost}?columns=name"):
                if item["name"].startswith((self.prefix + ".", f"b24queue.{self.prefix}.")):
                    await self.mgmt.delete(f"/api/{kind}/{vhost}/{quote(item['name'], safe='')}")


@asynccontextmanager
async def broker_slice() -> AsyncIterator[Broker]:
    """A test's own slice of the real broker (unique names), deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect_robust(
        AMQP_URL, client_properties={"connection_name": f"pytest {prefix}"}
    )
    basic = base64.b64encode(b"guest:guest").decode()
    async with aiohttp.ClientSession(headers={"Authorization": f"Basic {basic}"}) as session:
        b = Broker(prefix, connection, Management(session))
        try:
            yield b
        finally:
            await connection.close()
            await b.cleanup()


def cli_env(broker: Broker, **extra: str) -> dict[str, str]:
    """The environment of a `b24queue` subprocess on this test's slice of the broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
    env.update(
        {
            "B24QUEUE_AMQP_URL": AMQP_URL,
            "B24QUEUE_EXCHANGE": broker.settings.exchange,
            "B24QUEUE_UNROUTED": broker.settings.unrouted,
            "B24QUEUE_APP_TOKENS": SAMPLE_TOKEN,
            **extra,
        }
    )
    return env


async def start_cli(broker: Broker, *args: str, **extra_env: str) -> asyncio.subprocess.Process:
    """Start `python -m b24queue ARGS`, its stdout and stderr together on one pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24queue",
        *args,
        cwd=ROOT,
        env=cli_env(broker, **extra_env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def run_cli(broker: Broker, *args: str, **extra_env: str) -> tuple[int, str]:
    """Run `python -m b24queue ARGS`; (exit code, stdout and stderr)."""
    proc = await start_cli(broker, *args, **extra_env)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@asynccontextmanager
async def running_ingress(
    settings: Settings, *, wait_connected: bool = True, name: str = "ingress"
) -> AsyncIterator[tuple[TestClient[Any, Any], AmqpPublisher]]:
    """The real ingress app with the real publisher, on a loopback port."""
    async with AmqpPublisher(settings, f"b24queue {name} {settings.exchange}") as publisher:
        app = create_app(settings, publisher, StaticTokens(settings.app_tokens))
        async with TestClient(TestServer(app)) as client:
            if wait_connected:
                await asyncio.wait_for(publisher.connected.wait(), timeout=15)
            yield client, publisher
