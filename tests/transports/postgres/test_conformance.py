"""The scenarios every transport runs (tests/conformance), on PostgreSQL."""

from __future__ import annotations

from b24queue.settings import Settings
from tests.conformance.delivery import DeliveryScenarios
from tests.conformance.fairness import FairShareScenarios, FairShareUpgradeScenarios
from tests.conformance.ordering import OrderingScenarios, OrderingUpgradeScenarios
from tests.conformance.processes import ProcessScenarios
from tests.conformance.publishing import PublishingScenarios
from tests.conformance.status import StatusScenarios
from tests.conformance.unrouted_cap import UnroutedCapScenarios, UnroutedLedgerScenarios
from tests.support.bench import Bench
from tests.support.postgres import forget_ledger, to_schema_2, to_schema_3


class TestDeliveryOnPostgres(DeliveryScenarios):
    pass


class TestPublishingOnPostgres(PublishingScenarios):
    pass


class TestProcessesOnPostgres(ProcessScenarios):
    pass


class TestUnroutedCapOnPostgres(UnroutedCapScenarios):
    pass


class TestUnroutedLedgerOnPostgres(UnroutedLedgerScenarios):
    async def forget_ledger(self, settings: Settings) -> None:
        await forget_ledger(settings)


class TestStatusOnPostgres(StatusScenarios):
    counts_portals = True


class TestFairShareOnPostgres(FairShareScenarios):
    pass


class TestOrderingOnPostgres(OrderingScenarios):
    pass


class TestOrderingUpgradeOnPostgres(OrderingUpgradeScenarios):
    async def to_schema_3(self, bench: Bench) -> None:
        await to_schema_3(bench.settings)


class TestFairShareUpgradeOnPostgres(FairShareUpgradeScenarios):
    async def to_schema_2(self, bench: Bench) -> None:
        await to_schema_2(bench.settings)
