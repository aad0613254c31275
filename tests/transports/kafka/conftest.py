"""The Kafka transport's tests: one Tansu for the session (tests/support/kafka_server.py), a
namespace of topics per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.bench import Bench
from tests.support.kafka_server import KafkaServer, kafka_server, kafka_settings


@pytest.fixture(scope="session")
def tansu() -> Iterator[KafkaServer]:
    with kafka_server() as server:
        yield server


@pytest.fixture
def bench(tansu: KafkaServer) -> Bench:
    """A test's queue: its own events topic, unrouted topic and queues."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    return Bench(kafka_settings(tansu, prefix), prefix)
