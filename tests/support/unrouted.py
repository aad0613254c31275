"""The unrouted queue's cap seen from outside: events nobody binds posted through the real ingress
app (its metrics hooked as the ingress process hooks them), what the ingress counted as dropped,
and what the unrouted queue holds."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from b24queue.auth.tokens import StaticTokens
from b24queue.events.envelope import envelope_for
from b24queue.events.event import parse_event
from b24queue.ingress.app import create_app
from b24queue.settings import Settings
from b24queue.telemetry.metrics import IngressMetrics
from b24queue.transports import connection_name, transport_for
from tests.support.samples import FORM, sample_form
from tests.support.wait import wait_until

UNBOUND = "task-add"  # nobody binds ONTASKADD in these tests


def body_size(sample: str) -> int:
    """The body the ingress stores for a sample, in bytes (what the cap in bytes counts)."""
    return len(envelope_for(parse_event(FORM["Content-Type"], sample_form(sample))).body)


@contextlib.asynccontextmanager
async def ingress(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The real ingress app on a publisher of the settings' transport, its metrics hooked to
    what the publisher drops as the ingress process does (`ingress.process.serve_ingress`)."""
    async with transport_for(settings).publisher(connection_name("ingress", "cap")) as sink:
        await wait_until(sink.is_ready, 15, "the publisher ready")
        metrics = IngressMetrics()
        metrics.watch_unrouted(sink.unrouted)
        app = create_app(settings, sink, StaticTokens(settings.app_tokens), metrics)
        async with TestClient(TestServer(app)) as client:
            yield client


async def post_unbound(
    client: TestClient[Any, Any], count: int, sample: str = UNBOUND
) -> list[str]:
    ids = []
    for _ in range(count):
        resp = await client.post("/b24/events", data=sample_form(sample), headers=FORM)
        assert resp.status == 200, await resp.text()
        ids.append((await resp.json())["message_id"])
    return ids


async def dropped_metric(client: TestClient[Any, Any]) -> float:
    text = await (await client.get("/metrics")).text()
    [value] = re.findall(r"^b24queue_unrouted_dropped_total (\S+)$", text, re.M)
    return float(value)


async def unrouted_ids(settings: Settings) -> list[str]:
    async with transport_for(settings).dead_letters(settings.unrouted) as unrouted:
        total, letters = await unrouted.list(100)
    assert total == len(letters)
    return [x.message_id or "" for x in letters]
