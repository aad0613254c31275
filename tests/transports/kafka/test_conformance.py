"""The scenarios every transport runs (tests/conformance), on Kafka (Tansu). The unrouted
topic's cap is Kafka's own: test_unrouted_cap.py."""

from __future__ import annotations

from tests.conformance.delivery import DeliveryScenarios
from tests.conformance.processes import ProcessScenarios
from tests.conformance.status import StatusScenarios


class TestDeliveryOnKafka(DeliveryScenarios):
    pass


class TestProcessesOnKafka(ProcessScenarios):
    pass


class TestStatusOnKafka(StatusScenarios):
    pass
