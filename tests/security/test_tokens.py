"""Issue 36, finding 1: Bitrix24's documented bot and command events repeat the application token
deep in `data` (`data[BOT][<id>]` and its `[AUTH]`, `data[COMMAND][<id>]` likewise, and
`data[bot][auth]` in every imbot v2 event). None of it may reach a message: not the ingress's, not
a queue, the unrouted store or a dead-letter queue, looked at as the bytes stored there."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from b24queue import Event, EventConsumer, Reject
from b24queue import _constants as c
from b24queue.settings import load_settings
from b24queue.worker import Worker
from tests.support.bench import Bench
from tests.support.consumers import consumer
from tests.support.rabbitmq import AMQP_URL, Broker
from tests.support.samples import (
    SAMPLE_NAMES,
    SAMPLE_TOKEN,
    sample_form,
    sample_json,
    token_keys,
    token_values,
)
from tests.support.sinks import MemorySink
from tests.support.wait import wait_until

TOKEN = SAMPLE_TOKEN.encode()
BOT_SAMPLES = [n for n in SAMPLE_NAMES if n.startswith(("imbot", "imcommand"))]
# Those nobody binds in the tests below, to find them in the unrouted store; the others are
# rejected into a dead-letter queue.
V2 = [n for n in BOT_SAMPLES if n.startswith("imbot-v2-")]
LEGACY = [n for n in BOT_SAMPLES if n not in V2]
# The 13 events of the finding: every documented one that repeats the token in `data`.
DOCUMENTED = {
    "ONIMBOTMESSAGEADD",
    "ONIMBOTMESSAGEUPDATE",
    "ONIMBOTMESSAGEDELETE",
    "ONIMBOTJOINCHAT",
    "ONIMCOMMANDADD",
    *(f"ONIMBOTV2{e}" for e in ("MESSAGEADD", "MESSAGEUPDATE", "MESSAGEDELETE", "JOINCHAT")),
    *(f"ONIMBOTV2{e}" for e in ("DELETE", "CONTEXTGET", "COMMANDADD", "REACTIONCHANGE")),
}


def test_the_samples_carry_the_token_where_the_docs_show_it() -> None:
    """What makes the tests below mean something: 13 events with copies deep in `data`."""
    app = ("application_token",)
    deep = {sample_json(n)["event"] for n in BOT_SAMPLES if token_keys(sample_json(n)["data"], app)}
    assert deep == DOCUMENTED
    for name in BOT_SAMPLES:
        assert sample_form(name).count(TOKEN) == token_keys(sample_json(name), app), name
    # And an access token beside it in every legacy bot event: the tests below look for it too.
    assert all(len(token_values(sample_json(n))) >= 2 for n in LEGACY)


@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
@pytest.mark.parametrize("name", SAMPLE_NAMES)
async def test_no_message_the_ingress_makes_holds_the_token(
    client: TestClient[Any, Any], sink: MemorySink, name: str, as_json: bool
) -> None:
    if as_json:
        body, kind = json.dumps(sample_json(name)).encode(), "application/json"
    else:
        body, kind = sample_form(name), "application/x-www-form-urlencoded"
    resp = await client.post("/b24/events", data=body, headers={"Content-Type": kind})
    assert resp.status == 200, await resp.text()
    [envelope] = sink.published
    assert TOKEN not in envelope.body
    for value in token_values(sample_json(name)):  # the OAuth pair too, wherever it was
        assert value.encode() not in envelope.body, value
    assert not any(SAMPLE_TOKEN in f"{k}{v}" for k, v in envelope.headers.items())
    assert token_keys(json.loads(envelope.body)) == 0


async def dead_letter_the_bot_samples(bench: Bench) -> str:
    """Post every bot sample through the real ingress: LEGACY rejected by a consumer into its
    dead-letter queue, V2 bound by nobody (the unrouted store). Returns the consumer's queue."""
    events = tuple(sample_json(n)["event"] for n in LEGACY)

    async def reject(self: EventConsumer, event: Event) -> None:
        raise Reject(f"not today: {event.name}")

    cls = consumer(bench.name("bots"), events, reject)
    async with Worker(bench.settings, [cls]):
        await bench.post(*BOT_SAMPLES)
        async with bench.transport.dead_letters(cls.queue) as dlq:

            async def all_dead() -> bool:
                return await dlq.count() == len(LEGACY)

            await wait_until(all_dead, what="every legacy bot event dead-lettered")
    async with bench.transport.dead_letters(bench.settings.unrouted) as unrouted:
        assert await unrouted.count() == len(V2)
    return cls.queue


async def test_sqlite_stores_no_token_anywhere(tmp_path: Path) -> None:
    """Every byte SQLite keeps (the database, its journal): queue, unrouted, dead letters."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    folder = tmp_path / "queue"
    folder.mkdir()
    settings = load_settings(
        broker_url=f"sqlite:{folder / 'queue.sqlite3'}",
        app_tokens=SAMPLE_TOKEN,
        exchange=f"{prefix}.events",
        unrouted=f"{prefix}.unrouted",
        publish_timeout_s=3.0,
        shutdown_timeout_s=10.0,
        sqlite_poll_s=0.02,
    )
    await dead_letter_the_bot_samples(Bench(settings, prefix))
    stored = sorted(folder.iterdir())
    assert stored and sum(p.stat().st_size for p in stored) > 0
    for path in stored:
        assert TOKEN not in path.read_bytes(), path.name


@pytest.mark.broker
async def test_rabbitmq_dead_letters_and_unrouted_hold_no_token(broker: Broker) -> None:
    bench = Bench(broker.make_settings(broker_url=AMQP_URL), broker.prefix)
    queue = await dead_letter_the_bot_samples(bench)
    dead = await broker.take(queue + c.DLQ_SUFFIX, len(LEGACY))
    unrouted = await broker.take(bench.settings.unrouted, len(V2))
    for message in dead + unrouted:
        assert TOKEN not in message.body
        assert SAMPLE_TOKEN not in json.dumps(message.headers, default=str)
        assert token_keys(json.loads(message.body)) == 0
    assert {json.loads(m.body)["event"] for m in dead + unrouted} >= DOCUMENTED
