"""A binding added on the Kafka transport, on the tests' Tansu: the ingress follows the bindings
topic at most BINDINGS_EVERY_S behind, so for a moment it routes with the bindings it had. An
event another queue already takes then names only that queue in `to`; the new queue's worker
sees that the ingress routed it before its binding and matches it against its own."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from b24queue.transports.kafka import publisher
from tests.support.bench import Bench
from tests.support.consumers import Narrowing, RecordsAdds, record_done, record_starts
from tests.support.kafka_server import KafkaServer, kafka_settings
from tests.support.processes import env_for, start_workers, stop
from tests.support.samples import FORM, sample_form
from tests.support.wait import wait_until


# 8-9 s: long, run by make faults (make test within its ten minutes).
@pytest.mark.long
async def test_events_routed_before_the_ingress_saw_a_new_binding_reach_it(
    tansu: KafkaServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    old, new = bench.name("old"), bench.name("new")
    await bench.transport.declare([type("Old", (Narrowing,), {"queue": old, "events": ("#",)})])
    # The ingress reads the bindings once (the old queue's), and not again in this test: the
    # window, held open.
    monkeypatch.setattr(publisher, "BINDINGS_EVERY_S", 3600.0)
    ids = []
    async with bench.ingress() as client:
        await bench.transport.declare([type("New", (RecordsAdds,), {"queue": new})])
        for name in ("crm-deal-add", "crm-deal-update", "crm-deal-add"):
            resp = await client.post("/b24/events", data=sample_form(name), headers=FORM)
            assert resp.status == 200, await resp.text()
            ids.append((await resp.json())["message_id"])
    record = tmp_path / "record.txt"
    env = env_for(bench.settings, record, B24QT_QUEUE=new)
    [worker] = await start_workers(env, tmp_path, "tests.support.consumers:RecordsAdds", 1)
    try:
        await wait_until(
            lambda: record_done(record) >= {ids[0], ids[2]}, 30, "the additions handled"
        )
        assert await stop(worker) == 0
    finally:
        if worker.returncode is None:
            worker.kill()
    assert sorted(m for m, _ in record_starts(record)) == sorted([ids[0], ids[2]])  # not the update
