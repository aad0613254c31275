"""A `Producer` with a spool of its own (`spool=`), where the ingress has one: RabbitMQ away (a
TCP proxy cut in front of the machine's broker), messages are kept on disk and forwarded once it
is back, by the same producer or the next one of that name."""

from __future__ import annotations

from pathlib import Path

import pytest

from b24queue import Producer, PublishInputError
from b24queue.producer import producer_spool_path
from tests.support.proxy import Proxy
from tests.support.rabbitmq import Broker
from tests.support.wait import wait_until


@pytest.mark.broker
async def test_rabbitmq_away_a_producer_spools_and_forwards(broker: Broker, tmp_path: Path) -> None:
    proxy = Proxy()
    await proxy.start()
    settings = broker.make_settings(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
        spool_path=str(tmp_path / "spool.sqlite3"),
        publish_timeout_s=1.0,
        reconnect_interval_s=0.2,
    )
    queue = await broker.bind_queue("app", "APP.#")

    async def depth_is(n: int) -> bool:
        return await broker.depth(queue) == n

    try:
        async with Producer(settings, spool="web-1") as producer:
            await producer.publish("APP.SPOOL.TEST", {"n": 1})
            await wait_until(lambda: depth_is(1), what="the first, straight in")
            await proxy.cut()
            await producer.publish("APP.SPOOL.TEST", {"n": 2})  # kept on disk: returns
            assert producer_spool_path(settings, "web-1").exists()
            await proxy.start()
            await wait_until(lambda: depth_is(2), 20, "the spooled one forwarded")
            await proxy.cut()
            await producer.publish("APP.SPOOL.TEST", {"n": 3})
        # Closed with one spooled: the next producer of that name forwards it.
        await proxy.start()
        async with Producer(settings, spool="web-1"):
            await wait_until(lambda: depth_is(3), 20, "forwarded by the next producer")
    finally:
        await proxy.cut()


def test_a_spool_name_is_checked() -> None:
    with pytest.raises(PublishInputError) as caught:
        Producer(None, spool="../x")  # type: ignore[arg-type]
    assert caught.value.field == "spool"
