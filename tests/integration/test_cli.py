"""The CLI as a user runs it: `b24queue send` to a real ingress, `b24queue topology`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.rabbitmq import Broker, run_cli, running_ingress
from tests.support.samples import SAMPLES

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.broker


async def cli(broker: Broker, *args: str, **env: str) -> tuple[int, str]:
    queue = broker.name("cli")
    return await run_cli(broker, *args, B24QT_QUEUE=queue, B24QT_RECORD="/dev/null", **env)


async def test_send_posts_like_a_portal(broker: Broker) -> None:
    queue = await broker.bind_queue("all", "#")
    async with running_ingress(broker.settings) as (client, _):
        url = str(client.make_url("/b24/events"))
        code, out = await cli(
            broker,
            "send",
            "ONCRMDEALADD",
            "--url",
            url,
            "--field",
            "data[FIELDS][ID]=42",
            "--field",
            "auth[domain]=x.bitrix24.de",
        )
        assert code == 0, out
        assert out.startswith("200 ")
        message_id = json.loads(out[4:])["message_id"]
        code, out = await cli(
            broker, "send", "--url", url, "--body-file", str(SAMPLES / "task-add.form")
        )
        assert code == 0, out
        code, out = await cli(
            broker, "send", "ONCRMDEALADD", "--url", url, B24QUEUE_SEND_TOKEN="wrong"
        )
        assert code == 1 and out.startswith("401 ")
    first, second = await broker.take(queue, 2)
    assert first.message_id == message_id
    body = json.loads(first.body)
    assert body["data"] == {"FIELDS": {"ID": "42"}}
    assert body["auth"]["domain"] == "x.bitrix24.de"
    assert second.routing_key == "ONTASKADD"


async def test_topology_declares_and_reports(broker: Broker) -> None:
    code, out = await cli(broker, "topology", "tests.support.consumers:Recorder")
    assert code == 0, out
    queue = broker.name("cli")
    for name in (
        broker.settings.unrouted,
        queue,
        f"{queue}.retry.1s",
        f"{queue}.retry.600s",
        f"{queue}.dlq",
    ):
        assert name in out
    exchange, unrouted = broker.settings.exchange, broker.settings.unrouted
    assert f"exchange {exchange} (topic, alternate exchange {unrouted})" in out, out
    assert f"exchange {unrouted} (fanout) -> queue {unrouted}" in out, out
    code, out = await cli(broker, "topology", "--json", "tests.support.consumers:Recorder")
    assert code == 0, out
    listed = {q["queue"]: q for q in json.loads(out)}
    assert listed[f"{queue}.retry.5s"]["arguments"]["x-message-ttl"] == 5000
    assert listed[f"{queue}.retry.5s"]["arguments"]["x-dead-letter-routing-key"] == queue
    assert await broker.depth(queue) == 0
