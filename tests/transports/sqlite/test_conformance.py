"""The scenarios every transport runs (tests/conformance), on SQLite."""

from __future__ import annotations

import sqlite3

from b24queue.settings import Settings
from tests.conformance.delivery import DeliveryScenarios
from tests.conformance.processes import ProcessScenarios
from tests.conformance.status import StatusScenarios
from tests.conformance.unrouted_cap import UnroutedCapScenarios, UnroutedLedgerScenarios


class TestDeliveryOnSqlite(DeliveryScenarios):
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
    pass
