"""The Kafka transport's topics on the tests' Tansu: created with the retention b24queue needs
(a stock Kafka deletes records after 7 days by default), and an existing topic whose settings
differ is a topology mismatch naming the topic and the setting."""

from __future__ import annotations

import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from b24queue.errors import TopologyMismatchError
from tests.support.bench import Bench
from tests.support.consumers import Recorder
from tests.support.kafka_server import KafkaServer, kafka_settings, topic_configs


async def test_topics_are_created_with_the_retention_they_need(tansu: KafkaServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    queue = bench.name("kept")
    await bench.transport.declare([type("Kept", (Recorder,), {"queue": queue})])
    compacted = {f"{prefix}.events.bindings", f"{queue}.deliveries"}
    kept = {f"{prefix}.unrouted", f"{queue}.dlq"}
    for topic in compacted:
        assert (await topic_configs(tansu.bootstrap, topic)).get("cleanup.policy") == "compact", (
            topic
        )
    for topic in kept:
        assert (await topic_configs(tansu.bootstrap, topic)).get("retention.ms") == "-1", topic


async def test_an_existing_topic_with_other_retention_is_a_mismatch(tansu: KafkaServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    client = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await client.start()
    try:  # as an older b24queue made it: the broker's default retention
        await client.create_topics([NewTopic(f"{prefix}.events.bindings", 1, 1)])
    finally:
        await client.close()
    queue = bench.name("stale")
    with pytest.raises(TopologyMismatchError, match=r"bindings.*cleanup\.policy"):
        await bench.transport.declare([type("Stale", (Recorder,), {"queue": queue})])
