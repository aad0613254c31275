"""One portal's puller against a scripted portal (no broker, no HTTP): a reserved batch is not
forgotten when a get fails, and a record that cannot be published fails alone."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from b24queue.errors import BrokerUnavailableError
from b24queue.offline.puller import Puller, Target
from b24queue.offline.records import Batch, OfflineRecord
from b24queue.portal.api import PortalError
from b24queue.telemetry.metrics import OfflineMetrics
from tests.support.offline_stubs import ScriptedPortal, State, one_record_batch
from tests.support.sinks import MemorySink

TARGET = Target("mpull0ff", "pull.example", "b24queue", 50, 2**20, 30.0, "digest")


def puller(portal: ScriptedPortal, sink: MemorySink) -> Puller:
    return Puller(portal, sink, State(), TARGET, OfflineMetrics())  # type: ignore[arg-type]


async def test_a_failed_get_keeps_the_reserved_batch_asked_for() -> None:
    answers = iter([one_record_batch, None, one_record_batch])

    def get(params: dict[str, Any]) -> Any:
        answer = next(answers)
        if answer is None:
            raise PortalError("UNREACHABLE", "the portal away")
        return answer(params)

    portal, sink = ScriptedPortal(get), MemorySink()
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
    portal, sink = ScriptedPortal(one_record_batch), MemorySink()
    await puller(portal, sink)._finish(Batch("p1", [good, bad], [], 0, 0))
    assert len(sink.published) == 1
    sent = {m: p for _, m, p in portal.calls}
    assert sent["event.offline.clear"] == {"process_id": "p1", "id": ["1"]}
    assert sent["event.offline.error"] == {"process_id": "p1", "message_id": ["msg2"]}


async def test_the_lease_is_renewed_while_a_batch_takes_longer_than_it() -> None:
    class SlowSink(MemorySink):
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


async def test_a_failed_lease_keeps_the_batch_for_the_next_pull() -> None:
    class Blip(State):
        fail = True

        async def lease(self, key: str, owner: str, ttl_s: float) -> bool:
            if self.fail:
                self.fail = False
                raise OSError("database is locked")
            return True

    portal, sink = ScriptedPortal(one_record_batch), MemorySink()
    pulling = Puller(portal, sink, Blip(), TARGET, OfflineMetrics())  # type: ignore[arg-type]
    with pytest.raises(OSError):
        await pulling.pull_once()
    assert await pulling.pull_once() == 1
    gets = [p for _, m, p in portal.calls if m == "event.offline.get"]
    assert [g.get("process_id") for g in gets] == [None, "p1"]  # not left to recovery
    assert len(sink.published) == 1


async def test_a_lease_lost_mid_batch_is_logged_and_the_batch_still_finished(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Taken(State):
        async def renew(self, key: str, owner: str, ttl_s: float) -> bool:
            self.renewed.append(key)
            return False  # ran out, and another puller took it

    class SlowSink(MemorySink):
        async def publish(self, envelope: Any) -> None:
            await asyncio.sleep(0.2)
            await super().publish(envelope)

    portal, sink, state = ScriptedPortal(one_record_batch), SlowSink(), Taken()
    short = dataclasses.replace(TARGET, lease_s=0.06)
    pulling = Puller(portal, sink, state, short, OfflineMetrics())  # type: ignore[arg-type]
    assert await pulling.pull_once() == 1
    assert len(state.renewed) == 1  # not renewed again once lost
    assert "lease was lost" in caplog.text
    assert len(sink.published) == 1 and portal.calls[-1][1] == "event.offline.clear"


def too_large_over(most: int) -> Any:
    def get(params: dict[str, Any]) -> Any:
        if params["limit"] > most:
            raise PortalError("ANSWER_TOO_LARGE", "over the cap")
        return one_record_batch(params)

    return get


async def test_an_answer_too_large_is_asked_again_with_half_the_limit() -> None:
    portal, sink = ScriptedPortal(too_large_over(10)), MemorySink()
    pulling = puller(portal, sink)
    assert await pulling.pull_once() == 1
    assert [p["limit"] for _, m, p in portal.calls if m == "event.offline.get"] == [50, 25, 12, 6]
    assert len(sink.published) == 1 and pulling.asked == 6
    portal.calls.clear()
    assert await pulling.pull_once() == 1  # tries a step back up (still too large here)
    assert [p["limit"] for _, m, p in portal.calls if m == "event.offline.get"] == [12, 6]


class Reserved(ScriptedPortal):
    """Lists records reserved under `process_ids`."""

    def __init__(self, get: Any, process_ids: list[str]) -> None:
        super().__init__(get)
        self.process_ids = process_ids

    async def list(self, method: str, params: Any = None, *, max_items: int = 100_000) -> Any:
        for process_id in self.process_ids:
            yield {"PROCESS_ID": process_id}


async def test_a_record_too_large_to_read_is_left_reserved_and_blocks_no_other_batch() -> None:
    def get(params: dict[str, Any]) -> Any:
        if params.get("process_id") in (None, "huge"):
            raise PortalError("ANSWER_TOO_LARGE", "over the cap")
        return one_record_batch(params)

    portal, sink, metrics = Reserved(get, ["huge", "p2"]), MemorySink(), OfflineMetrics()
    pulling = Puller(portal, sink, State(), TARGET, metrics)  # type: ignore[arg-type]
    with pytest.raises(PortalError):
        await pulling.pull_once()
    assert metrics.totals["unreadable"] == 1
    assert await pulling.recover() == 0  # "huge" left for the next pass, p2 redone
    assert metrics.totals["unreadable"] == 2 and metrics.totals["recovered_batches"] == 1
    assert len(sink.published) == 1
    assert portal.calls[-1][1:] == ("event.offline.clear", {"process_id": "p2", "id": ["1"]})
    assert not any(m == "event.offline.error" for _, m, _ in portal.calls)
