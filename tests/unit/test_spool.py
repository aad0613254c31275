"""The durable spool and the spooling sink, with an in-memory broker stand-in (no RabbitMQ:
the real-broker spool path is in tests/security/test_pipeline.py and tests/faults)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from b24queue.errors import BrokerUnavailableError, PublishError, SpoolFullError
from b24queue.events.envelope import Envelope, envelope_for
from b24queue.ingress.fallback import SpoolingSink
from b24queue.ingress.spool import Spool, merge_stray_spools, slot_path, stray_spools
from b24queue.telemetry.metrics import IngressMetrics
from b24queue.testing import make_event


def envelope(i: int) -> Envelope:
    return envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": str(i)}}))


class FlakyBroker:
    def __init__(self) -> None:
        self.ready = True
        self.fail_with: Exception | None = None
        self.published: list[str] = []
        self.delay_s = 0.0

    def is_ready(self) -> bool:
        return self.ready

    async def publish(self, envelope: Envelope) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        self.published.append(envelope.message_id)


async def test_spooled_events_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    sent = [envelope(i) for i in range(5)]
    async with Spool(path, 100) as spool:
        await asyncio.gather(*(spool.put(e) for e in sent))
        assert spool.count == 5
    async with Spool(path, 100) as spool:
        assert spool.count == 5 and spool.not_empty.is_set()
        rows = await spool.oldest(10)
        assert [e.message_id for _, e in rows] == [e.message_id for e in sent]
        got = rows[0][1]
        assert (got.body, got.headers, got.routing_key, got.timestamp) == (
            sent[0].body,
            sent[0].headers,
            sent[0].routing_key,
            sent[0].timestamp,
        )
        await spool.delete([row_id for row_id, _ in rows[:3]])
    async with Spool(path, 100) as spool:
        assert [e.message_id for _, e in await spool.oldest(10)] == [e.message_id for e in sent[3:]]


async def test_a_full_spool_refuses(tmp_path: Path) -> None:
    async with Spool(tmp_path / "s.db", 2) as spool:
        await spool.put(envelope(1))
        await spool.put(envelope(2))
        assert not spool.has_room()
        with pytest.raises(SpoolFullError, match="full"):
            await spool.put(envelope(3))


async def test_sink_uses_the_broker_while_it_works(tmp_path: Path) -> None:
    broker = FlakyBroker()
    async with (
        Spool(tmp_path / "s.db", 10) as spool,
        SpoolingSink(broker, spool, bypass_s=5, retry_interval_s=0.01) as sink,
    ):
        e = envelope(1)
        await sink.publish(e)
        assert broker.published == [e.message_id] and spool.count == 0


async def test_broker_down_spools_then_forwards(tmp_path: Path) -> None:
    broker = FlakyBroker()
    broker.ready = False
    async with (
        Spool(tmp_path / "s.db", 10) as spool,
        SpoolingSink(broker, spool, bypass_s=5, retry_interval_s=0.01) as sink,
    ):
        sent = [envelope(i) for i in range(4)]
        for e in sent:
            await sink.publish(e)  # answered: on disk
        assert spool.count == 4 and broker.published == []
        assert sink.is_ready()  # the spool still takes events
        broker.ready = True
        await asyncio.wait_for(_until(lambda: spool.count == 0), 5)
        assert broker.published == [e.message_id for e in sent]
        assert (sink.spooled_total, sink.forwarded_total) == (4, 4)


async def test_a_timeout_spools_and_later_requests_skip_the_wait(tmp_path: Path) -> None:
    broker = FlakyBroker()
    broker.fail_with = BrokerUnavailableError("RabbitMQ did not confirm within 0.75s")
    async with (
        Spool(tmp_path / "s.db", 10) as spool,
        SpoolingSink(broker, spool, bypass_s=60, retry_interval_s=0.01) as sink,
    ):
        await sink.publish(envelope(1))
        broker.delay_s = 10  # would hang; the bypass must not even try
        await asyncio.wait_for(sink.publish(envelope(2)), 1)
        assert spool.count >= 1


async def test_a_nack_spools_but_an_unroutable_event_is_refused(tmp_path: Path) -> None:
    broker = FlakyBroker()
    async with (
        Spool(tmp_path / "s.db", 10) as spool,
        SpoolingSink(broker, spool, bypass_s=0, retry_interval_s=60) as sink,
    ):
        broker.fail_with = PublishError("nack")
        await sink.publish(envelope(1))
        assert spool.count == 1
        broker.fail_with = PublishError("returned", returned=True)
        with pytest.raises(PublishError):
            await sink.publish(envelope(2))
        assert spool.count == 1


async def test_broker_down_and_spool_full_is_unavailable(tmp_path: Path) -> None:
    broker = FlakyBroker()
    broker.ready = False
    async with (
        Spool(tmp_path / "s.db", 1) as spool,
        SpoolingSink(broker, spool, bypass_s=5, retry_interval_s=60) as sink,
    ):
        await sink.publish(envelope(1))
        assert not sink.is_ready()
        with pytest.raises(BrokerUnavailableError, match="spool is full"):
            await sink.publish(envelope(2))


async def _until(predicate: object) -> None:
    assert callable(predicate)
    while not predicate():
        await asyncio.sleep(0.01)


async def test_a_stray_slot_spool_is_merged_into_slot_0_and_removed(tmp_path: Path) -> None:
    base = tmp_path / "spool.sqlite3"
    assert slot_path(base, 0) == base
    assert slot_path(base, 2) == tmp_path / "spool.2.sqlite3"
    async with Spool(base, 100) as spool:
        await spool.put(envelope(0))
    for slot, ids in ((1, [1, 2]), (2, [3])):
        async with Spool(slot_path(base, slot), 100) as spool:
            for i in ids:
                await spool.put(envelope(i))

    # A run with two processes keeps slot 1; slot 2's events move into slot 0's file.
    assert merge_stray_spools(base, keep=2) == 1
    assert not slot_path(base, 2).exists()
    assert slot_path(base, 1).exists()
    # A run with one process takes slot 1's too.
    assert merge_stray_spools(base, keep=1) == 2
    assert stray_spools(base, keep=1) == []
    async with Spool(base, 100) as spool:
        assert spool.count == 4
        moved = await spool.oldest(10)
    ids = [json.loads(e.body)["data"]["FIELDS"]["ID"] for _, e in moved]
    assert ids == ["0", "3", "1", "2"]  # slot 0 first, then each stray as it was merged


async def test_merging_with_no_strays_touches_nothing(tmp_path: Path) -> None:
    base = tmp_path / "spool.sqlite3"
    assert merge_stray_spools(base, keep=1) == 0
    assert not base.exists()


async def test_spool_counts_reach_the_metrics_as_they_change(tmp_path: Path) -> None:
    broker = FlakyBroker()
    metrics = IngressMetrics()

    def value(name: str) -> float:
        for line in metrics.render().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    spool = Spool(tmp_path / "s.sqlite3", 100)
    async with spool, SpoolingSink(broker, spool, bypass_s=5, retry_interval_s=0.05) as sink:
        metrics.watch_spool(sink)
        broker.ready = False
        for i in range(3):
            await sink.publish(envelope(i))
        assert (
            value("b24queue_ingress_spooled_total"),
            value("b24queue_ingress_spool_events"),
        ) == (3, 3)
        broker.ready = True
        for _ in range(100):
            if value("b24queue_ingress_forwarded_total") == 3:
                break
            await asyncio.sleep(0.05)
        assert value("b24queue_ingress_forwarded_total") == 3
        assert value("b24queue_ingress_spool_events") == 0


class PoisonBroker(FlakyBroker):
    """Publishing the `poison` message breaks the connection (as a header frame over frame_max
    does), failing every publish in flight with it; or the broker refuses it for itself."""

    def __init__(self, poison: str, *, permanent: bool = False) -> None:
        super().__init__()
        self.poison = poison
        self.permanent = permanent
        self.breaks = 0
        self._in_flight = 0
        self._broken = False

    async def publish(self, envelope: Envelope) -> None:
        self._in_flight += 1
        try:
            if envelope.message_id == self.poison:
                if self.permanent:
                    raise PublishError("message size 999 is larger than max size", permanent=True)
                self.breaks += 1
                self._broken = True
            await asyncio.sleep(0.001)  # the batch is in flight together
            if self._broken:
                raise BrokerUnavailableError("connection to RabbitMQ failed: FRAME_ERROR")
            self.published.append(envelope.message_id)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._broken = False


async def test_a_spooled_event_that_breaks_the_connection_is_moved_aside(tmp_path: Path) -> None:
    sent = [envelope(i) for i in range(5)]
    broker = PoisonBroker(poison=sent[0].message_id)  # the oldest: the head of the line
    broker.ready = False
    async with (
        Spool(tmp_path / "s.db", 10) as spool,
        SpoolingSink(broker, spool, bypass_s=5, retry_interval_s=0.01) as sink,
    ):
        for e in sent:
            await sink.publish(e)
        broker.ready = True
        await asyncio.wait_for(_until(lambda: spool.count == 0), 5)
        # Everything behind it went on; it is kept aside, not lost and not retried forever.
        assert broker.published == [e.message_id for e in sent[1:]]
        assert (spool.quarantined, sink.quarantined_total, sink.forwarded_total) == (1, 1, 4)
    async with Spool(tmp_path / "s.db", 10) as spool:  # it survives a restart
        assert (spool.count, spool.quarantined) == (0, 1)


async def test_a_message_the_broker_refuses_is_never_spooled_and_moved_aside_if_spooled(
    tmp_path: Path,
) -> None:
    poison, fine = envelope(1), envelope(2)
    broker = PoisonBroker(poison=poison.message_id, permanent=True)
    async with (
        Spool(tmp_path / "s.db", 10) as spool,
        SpoolingSink(broker, spool, bypass_s=0, retry_interval_s=0.01) as sink,
    ):
        with pytest.raises(PublishError) as info:
            await sink.publish(poison)
        assert info.value.permanent and spool.count == 0
        # One spooled by an older version (or while the broker was down) goes aside at once.
        broker.ready = False
        await sink.publish(poison)
        await sink.publish(fine)
        broker.ready = True
        await asyncio.wait_for(_until(lambda: spool.count == 0), 5)
        assert broker.published == [fine.message_id] and spool.quarantined == 1


async def test_a_stopped_broker_never_moves_events_aside(tmp_path: Path) -> None:
    broker = FlakyBroker()
    broker.fail_with = BrokerUnavailableError("RabbitMQ did not confirm within 0.75s")
    async with (
        Spool(tmp_path / "s.db", 10) as spool,
        SpoolingSink(broker, spool, bypass_s=0, retry_interval_s=0.001) as sink,
    ):
        await sink.publish(envelope(1))
        for _ in range(20):  # many failed forwards, none of which broke a connection
            await sink._forward_batch()
        assert (spool.count, spool.quarantined) == (1, 0)


async def test_spool_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        async with Spool(tmp_path / "s.db", 10) as spool:
            await spool.put(envelope(1))
            for suffix in ("", "-wal", "-shm", ".lock"):
                mode = stat.S_IMODE((tmp_path / f"s.db{suffix}").stat().st_mode)
                assert mode == 0o600, (suffix, oct(mode))
    finally:
        os.umask(old)


async def test_two_ingresses_cannot_share_a_spool(tmp_path: Path) -> None:
    from b24queue.ingress.spool import SpoolInUseError

    async with Spool(tmp_path / "s.db", 10):
        with pytest.raises(SpoolInUseError, match="in use by another ingress process"):
            async with Spool(tmp_path / "s.db", 10):
                pass
    async with Spool(tmp_path / "s.db", 10):  # free again once closed
        pass


async def test_merging_leaves_a_stray_spool_that_a_running_process_owns(tmp_path: Path) -> None:
    from b24queue.ingress.spool import SpoolInUseError

    base = tmp_path / "spool.sqlite3"
    async with Spool(slot_path(base, 1), 10) as running:
        await running.put(envelope(1))
        # A second ingress started in this directory with one process must not take slot 1's
        # events from under the process that answered 200 for them.
        assert merge_stray_spools(base, keep=1) == 0
        assert slot_path(base, 1).exists() and running.count == 1
        async with Spool(base, 10):  # and slot 0 in use: merging into it is refused
            with pytest.raises(SpoolInUseError):
                merge_stray_spools(base, keep=1)
    assert merge_stray_spools(base, keep=1) == 1
