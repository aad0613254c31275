"""The scenarios every transport runs (tests/conformance), on RabbitMQ."""

from __future__ import annotations

from tests.conformance.delivery import DeliveryScenarios
from tests.conformance.fairness import FairShareScenarios
from tests.conformance.processes import ProcessScenarios
from tests.conformance.publishing import PublishingScenarios
from tests.conformance.status import StatusScenarios
from tests.conformance.unrouted_cap import UnroutedCapScenarios


class TestDeliveryOnRabbitMQ(DeliveryScenarios):
    pass


class TestPublishingOnRabbitMQ(PublishingScenarios):
    pass


class TestProcessesOnRabbitMQ(ProcessScenarios):
    pass


class TestUnroutedCapOnRabbitMQ(UnroutedCapScenarios):
    pass


class TestStatusOnRabbitMQ(StatusScenarios):
    pass


class TestFairShareOnRabbitMQ(FairShareScenarios):
    pass
