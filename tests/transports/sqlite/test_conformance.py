"""The scenarios every transport runs (tests/conformance), on SQLite."""

from __future__ import annotations

import sqlite3

from b24queue.settings import Settings
from tests.conformance.delivery import DeliveryScenarios
from tests.conformance.fairness import FairShareScenarios, FairShareUpgradeScenarios
from tests.conformance.ordering import OrderingScenarios, OrderingUpgradeScenarios
from tests.conformance.processes import ProcessScenarios
from tests.conformance.publishing import PublishingScenarios
from tests.conformance.status import StatusScenarios
from tests.conformance.unrouted_cap import UnroutedCapScenarios, UnroutedLedgerScenarios
from tests.support.bench import Bench


class TestDeliveryOnSqlite(DeliveryScenarios):
    pass


class TestPublishingOnSqlite(PublishingScenarios):
    pass


class TestProcessesOnSqlite(ProcessScenarios):
    pass


class TestUnroutedCapOnSqlite(UnroutedCapScenarios):
    pass


class TestUnroutedLedgerOnSqlite(UnroutedLedgerScenarios):
    async def forget_ledger(self, settings: Settings) -> None:
        file = sqlite3.connect(settings.sqlite_path)
        with file:
            file.execute("DROP TABLE queue_sizes")
        file.close()


class TestStatusOnSqlite(StatusScenarios):
    counts_portals = True


class TestFairShareOnSqlite(FairShareScenarios):
    pass


class TestOrderingOnSqlite(OrderingScenarios):
    pass


class TestOrderingUpgradeOnSqlite(OrderingUpgradeScenarios):
    async def to_schema_3(self, bench: Bench) -> None:
        to_schema_3(bench.settings)


class TestFairShareUpgradeOnSqlite(FairShareUpgradeScenarios):
    async def to_schema_2(self, bench: Bench) -> None:
        to_schema_3(bench.settings)
        file = sqlite3.connect(bench.settings.sqlite_path)
        with file:
            file.execute("DROP INDEX messages_portal")
            file.execute("ALTER TABLE messages DROP COLUMN portal")
            file.execute("DROP TABLE portal_turns")
            file.execute("DROP TABLE queue_clocks")
            file.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
        file.close()


def to_schema_3(settings: Settings) -> None:
    """As a queue made by a b24queue before ordered claims: no order_key, schema 3."""
    file = sqlite3.connect(settings.sqlite_path)
    with file:
        file.execute("DROP INDEX messages_order")
        file.execute("ALTER TABLE messages DROP COLUMN order_key")
        file.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    file.close()
