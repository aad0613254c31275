"""A connection RabbitMQ blocks (a memory or disk alarm) takes no publish: the ingress's
publisher is not ready and refuses at once, until the broker unblocks it. Both ways the check
can go (`internals.blocked`): aiormq's own flag, and the public `Connection.ready()` that any
other aiormq release gets.

RabbitMQ blocks every publishing connection of the node at once; the machine's broker is shared,
so here a proxy in front of it puts the broker's Connection.Blocked and Unblocked frames between
the ones it passes on, for this one connection. (The real alarm: the memory-alarm tests of
`make faults`.)"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pamqp import commands as spec
from pamqp import frame

from b24queue.errors import BrokerUnavailableError
from b24queue.events.envelope import envelope_for
from b24queue.testing import make_event
from b24queue.transports.amqp import internals
from b24queue.transports.amqp.publisher import AmqpPublisher
from tests.support.rabbitmq import Broker
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker


class FrameProxy:
    """Passes a client's bytes to RabbitMQ as they come, and RabbitMQ's back frame by frame, so
    that `send` can put a frame of its own between two of them."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._clients: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"amqp://guest:guest@127.0.0.1:{self._server.sockets[0].getsockname()[1]}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def send(self, value: Any) -> None:
        for client in self._clients:
            client.write(frame.marshal(value, 0))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        self._clients.append(writer)
        pumps = [
            asyncio.create_task(self._bytes(reader, up_writer)),
            asyncio.create_task(self._frames(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            self._clients.remove(writer)
            writer.transport.abort()
            up_writer.transport.abort()

    @staticmethod
    async def _bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)

    @staticmethod
    async def _frames(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # type (1), channel (2), size (4), payload, frame end (1): written whole
            header = await reader.readexactly(7)
            writer.write(header + await reader.readexactly(int.from_bytes(header[3:7]) + 1))


@pytest.fixture
async def proxy() -> AsyncIterator[FrameProxy]:
    proxy = FrameProxy()
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.mark.parametrize("flag", [True, False], ids=["aiormq's flag", "Connection.ready()"])
async def test_a_blocked_connection_is_not_ready_and_refuses_publishes_until_unblocked(
    broker: Broker, proxy: FrameProxy, monkeypatch: pytest.MonkeyPatch, flag: bool
) -> None:
    monkeypatch.setattr(internals, "ON", dataclasses.replace(internals.ON, blocked_flag=flag))
    settings = broker.make_settings(amqp_url=proxy.url, publish_timeout_s=30.0)
    queue = await broker.bind_queue("blocked", "ONCRMDEALADD")
    before, during = (envelope_for(make_event("ONCRMDEALADD", {"N": n})) for n in ("1", "2"))
    async with AmqpPublisher(settings, f"pytest blocked {broker.prefix}") as publisher:
        await wait_until(publisher.is_ready, 10, "the publisher connected")
        await publisher.publish(before)
        proxy.send(spec.Connection.Blocked(reason="low on memory"))
        await wait_until(lambda: not publisher.is_ready(), 10, "the block noticed")
        # Refused before anything is written (the broker behind the proxy is not blocked: a
        # publish that went out would be confirmed), not after the 30 s publish timeout.
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match="blocked publishing"):
            await publisher.publish(during)
        assert time.monotonic() - started < 10
        assert not publisher.is_ready()
        proxy.send(spec.Connection.Unblocked())
        await wait_until(publisher.is_ready, 10, "the unblock noticed")
        await publisher.publish(during)
    got = {m.message_id for m in await broker.take(queue, 2)}
    assert got == {before.message_id, during.message_id}
