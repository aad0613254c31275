"""The RabbitMQ transport's tests: the machine's RabbitMQ, a slice of it per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.bench import Bench
from tests.support.rabbitmq import AMQP_URL, broker_slice


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    """A test's queue on the machine's RabbitMQ (its own names, deleted afterwards)."""
    async with broker_slice() as broker:
        yield Bench(broker.make_settings(broker_url=AMQP_URL), broker.prefix)
