"""One portal's puller against a scripted portal (no broker, no HTTP): a reserved batch is not
forgotten when a get fails, and a record that cannot be published fails alone."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from b24queue.errors import BrokerUnavailableError
from b24queue.metrics import OfflineMetrics
from b24queue.offline.puller import Puller, Target
from b24queue.offline.records import Batch, OfflineRecord
from b24queue.portal.api import PortalError
from tests.offline_fakes import ScriptedPortal, Sink, State, one_record_batch

TARGET = Target("mpull0ff", "pull.example", "b24queue", 50, 2**20, 30.0, "digest")


def puller(portal: ScriptedPortal, sink: Sink) -> Puller:
    return Puller(portal, sink, State(), TARGET, OfflineMetrics())  # type: ignore[arg-type]


async def test_a_failed_get_keeps_the_reserved_batch_asked_for() -> None:
    answers = iter([one_record_batch, None, one_record_batch])

    def get(params: dict[str, Any]) -> Any:
        answer = next(answers)
        if answer is None:
            raise PortalError("UNREACHABLE", "the portal away")
        return answer(params)

    portal, sink = ScriptedPortal(get), Sink()
    pulling = puller(portal, sink)
    sink.fail = BrokerUnavailableError("away")
    with pytest.raises(BrokerUnavailableError):
        await pulling.pull_once()  # p1 stays reserved
    sink.fail = None
    with pytest.raises(PortalError):
        await pulling.pull_once()  # the get fails
    assert await pulling.pull_once() == 1
    gets = [p for _, m, p in portal.calls if m == "event.offline.get"]
    assert [g.get("process_id") for g in gets] == [None, "p1", "p1"]
    assert len(sink.published) == 1 and portal.calls[-1][1] == "event.offline.clear"


async def test_a_record_that_cannot_be_serialised_is_marked_and_the_rest_published() -> None:
    deep: Any = None
    for _ in range(300):
        deep = [deep]
    good = OfflineRecord("1", "msg1", "ONCRMDEALUPDATE", "2026-11-29T23:00:00", {}, {})
    bad = OfflineRecord("2", "msg2", "ONCRMDEALUPDATE", "2026-11-29T23:00:00", deep, {})
    portal, sink = ScriptedPortal(one_record_batch), Sink()
    await puller(portal, sink)._finish(Batch("p1", [good, bad], [], 0, 0))
    assert len(sink.published) == 1
    sent = {m: p for _, m, p in portal.calls}
    assert sent["event.offline.clear"] == {"process_id": "p1", "id": ["1"]}
    assert sent["event.offline.error"] == {"process_id": "p1", "message_id": ["msg2"]}


async def test_the_lease_is_renewed_while_a_batch_takes_longer_than_it() -> None:
    class SlowSink(Sink):
        async def publish(self, envelope: Any) -> None:
            await asyncio.sleep(0.3)  # a busy broker, or a call waiting for the bucket
            await super().publish(envelope)

    state = State()
    short = dataclasses.replace(TARGET, lease_s=0.06)
    portal = ScriptedPortal(one_record_batch)
    pulling = Puller(portal, SlowSink(), state, short, OfflineMetrics())  # type: ignore[arg-type]
    assert await pulling.pull_once() == 1
    assert len(state.renewed) >= 3 and state.released == ["offline:mpull0ff:p1"]
    count = len(state.renewed)
    await asyncio.sleep(0.1)
    assert len(state.renewed) == count  # and no longer once it is done
