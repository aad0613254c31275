"""The unrouted topic's cap on Kafka: created capped in bytes, what to run for a topic made
before the cap, and a broker without DeleteRecords (Tansu 0.6: it enforces neither of Kafka's
means, so the events stay). The cap on the other transports: tests/conformance/unrouted_cap.py."""

from __future__ import annotations

import logging
import uuid

import pytest

from b24queue.transports import transport_for
from tests.support.bench import Bench
from tests.support.kafka_server import KafkaServer, kafka_settings, topic_configs
from tests.support.unrouted import dropped_metric, ingress, post_unbound, unrouted_ids
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker


async def test_kafka_creates_the_unrouted_topic_capped_in_bytes(tansu: KafkaServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = kafka_settings(tansu, prefix, unrouted_max_bytes=64 * 1024 * 1024)
    await transport_for(settings).declare([])
    configs = await topic_configs(tansu.bootstrap, settings.unrouted)
    assert configs["retention.ms"] == "-1"  # never by age
    assert configs["retention.bytes"] == str(64 * 1024 * 1024)
    assert configs["segment.bytes"] == str(8 * 1024 * 1024)  # an eighth: the cap bites


async def test_kafka_says_how_to_cap_an_unrouted_topic_made_before(
    tansu: KafkaServer, caplog: pytest.LogCaptureFixture
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = kafka_settings(tansu, prefix)
    client = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await client.start()
    try:  # as an older b24queue made it: kept for ever, no cap
        await client.create_topics(
            [NewTopic(settings.unrouted, 1, 1, topic_configs={"retention.ms": "-1"})]
        )
    finally:
        await client.close()
    with caplog.at_level(logging.WARNING):
        await transport_for(settings).declare([])  # not a mismatch: it runs
    [line] = [r.getMessage() for r in caplog.records if "has no cap" in r.getMessage()]
    assert f"--entity-name {settings.unrouted} --add-config retention.bytes=" in line


async def test_kafka_without_delete_records_says_so_and_publishes_on(
    tansu: KafkaServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Tansu 0.6 has no DeleteRecords, by which a publisher keeps the count: said once, and
    the events still go in (its bytes cap would be retention.bytes, which Tansu ignores too)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = kafka_settings(tansu, prefix, unrouted_max_events=2)
    caplog.set_level(logging.DEBUG, logger="b24queue.transports.kafka.unrouted")
    bench = Bench(settings, prefix)
    async with ingress(settings) as client:
        ids = await post_unbound(client, 5)

        def said() -> bool:
            return any("did not delete" in r.getMessage() for r in caplog.records)

        await wait_until(said, 15, "the refusal said")
        assert await dropped_metric(client) == 0
    warned = [r for r in caplog.records if "did not delete" in r.getMessage()]
    first, *later = [r.levelno for r in warned]
    assert first == logging.WARNING and set(later) <= {logging.DEBUG}
    assert await unrouted_ids(bench.settings) == ids
