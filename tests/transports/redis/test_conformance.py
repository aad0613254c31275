"""The scenarios every transport runs (tests/conformance), on Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from b24queue.settings import Settings
from tests.conformance.delivery import DeliveryScenarios
from tests.conformance.fairness import FairShareScenarios, FairShareUpgradeScenarios
from tests.conformance.processes import ProcessScenarios
from tests.conformance.publishing import PublishingScenarios
from tests.conformance.status import StatusScenarios
from tests.conformance.unrouted_cap import UnroutedCapScenarios, UnroutedLedgerScenarios
from tests.support.bench import Bench


class TestDeliveryOnRedis(DeliveryScenarios):
    pass


class TestPublishingOnRedis(PublishingScenarios):
    pass


class TestProcessesOnRedis(ProcessScenarios):
    pass


class TestUnroutedCapOnRedis(UnroutedCapScenarios):
    pass


class TestUnroutedLedgerOnRedis(UnroutedLedgerScenarios):
    async def forget_ledger(self, settings: Settings) -> None:
        client = aioredis.Redis.from_url(settings.broker_url)
        try:
            await client.delete(f"{settings.redis_prefix}:q:{settings.unrouted}:bytes")
        finally:
            await client.aclose()


class TestStatusOnRedis(StatusScenarios):
    counts_portals = True


class TestFairShareOnRedis(FairShareScenarios):
    pass


class TestFairShareUpgradeOnRedis(FairShareUpgradeScenarios):
    async def to_schema_2(self, bench: Bench) -> None:
        """Nothing to take back: a fair queue is the stream and group a queue made before
        fair claims has; its portals' lists are made by the first fair claim."""
