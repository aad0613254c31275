"""`b24queue spool` and `status` on spool files with quarantined events, against the real
RabbitMQ: list shows why, replay publishes them (confirmed) and removes them, drop deletes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from b24queue.events.envelope import Envelope, envelope_for
from b24queue.ingress.spool import Spool
from b24queue.testing import make_event
from tests.support.rabbitmq import Broker, run_cli

pytestmark = pytest.mark.broker


def event(i: int) -> Envelope:
    return envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": str(i)}}))


async def quarantine(path: Path, envelopes: list[Envelope]) -> None:
    async with Spool(path, 100) as spool:
        for e in envelopes:
            await spool.put(e)
        for row_id, _ in await spool.oldest(100):
            await spool.quarantine(row_id, "the broker refused it (test)")


async def test_list_replay_and_drop_quarantined_events(broker: Broker, tmp_path: Path) -> None:
    queue = await broker.bind_queue("all", "#")
    path = tmp_path / "spool.sqlite3"
    fine = [event(1), event(2)]
    too_big = replace(event(3), headers={"x-b24-domain": "a" * 10_000})
    await quarantine(path, [*fine, too_big])
    env = {"B24QUEUE_SPOOL_PATH": str(path)}

    code, out = await run_cli(broker, "spool", "list", "--json", **env)
    assert code == 0, out
    listed = json.loads(out[out.index("{") :])
    assert [f["quarantined"] for f in listed["files"]] == [3]
    assert {q["message_id"] for q in listed["quarantined"]} == {
        e.message_id for e in [*fine, too_big]
    }
    assert all(q["reason"] == "the broker refused it (test)" for q in listed["quarantined"])

    code, out = await run_cli(broker, "status", **env)
    assert "3 quarantined" in out, out

    code, out = await run_cli(broker, "spool", "replay", **env)
    assert code == 1, out  # one is still refused: said, and kept
    assert "replayed 2" in out and f"still refused {too_big.message_id}" in out
    got = await broker.take(queue, 2)
    assert {m.message_id for m in got} == {e.message_id for e in fine}

    code, out = await run_cli(broker, "spool", "drop", too_big.message_id, "--yes", **env)
    assert code == 0 and "deleted 1" in out, out
    code, out = await run_cli(broker, "spool", "list", **env)
    assert "0 waiting to be forwarded, 0 quarantined" in out, out
