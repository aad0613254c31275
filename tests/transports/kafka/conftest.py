"""The Kafka transport's tests: one Tansu for the session (tests/support/kafka_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.kafka_server import KafkaServer, kafka_server


@pytest.fixture(scope="session")
def tansu() -> Iterator[KafkaServer]:
    with kafka_server() as server:
        yield server
