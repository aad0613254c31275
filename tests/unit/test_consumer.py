from __future__ import annotations

from typing import Any

import pytest

from b24queue import Event, EventConsumer
from b24queue.errors import ConfigError


def make(**attrs: Any) -> type[EventConsumer]:
    async def handle(self: EventConsumer, event: Event) -> None:
        return None

    body: dict[str, Any] = {"queue": "deals", "events": ("ONCRMDEALADD",), "handle": handle}
    body.update(attrs)
    return type("MyConsumer", (EventConsumer,), body)


def test_a_good_consumer_passes() -> None:
    cls = make(events=("onCrmDealAdd", "ONCRMDEALADD", "#"))
    cls.check()
    assert cls.binding_keys() == ("ONCRMDEALADD", "#")


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ({"queue": ""}, "MyConsumer.queue must be a queue name"),
        ({"queue": "has space"}, "MyConsumer.queue must be a queue name"),
        ({"queue": "amq.x"}, "MyConsumer.queue 'amq.x' uses a reserved name"),
        ({"queue": "x.dlq"}, "reserved name"),
        ({"queue": "x.retry.5s"}, "reserved name"),
        ({"events": ()}, "MyConsumer.events must be a non-empty tuple"),
        ({"events": "ONCRMDEALADD"}, "MyConsumer.events must be a non-empty tuple"),
        ({"events": ("ON..CRM",)}, "MyConsumer.events has 'ON..CRM'"),
        ({"events": ("ONCRM*",)}, "MyConsumer.events has 'ONCRM*'"),
        ({"prefetch": 0}, "MyConsumer.prefetch must be an int from 1"),
        ({"fair_share": 1}, "MyConsumer.fair_share must be True or False"),
        ({"max_in_flight_per_portal": 0}, "MyConsumer.max_in_flight_per_portal must be an int"),
        ({"max_in_flight_per_portal": True}, "max_in_flight_per_portal must be an int >= 1"),
        (
            {"max_in_flight_per_portal": 2, "fair_share": False},
            "MyConsumer.max_in_flight_per_portal needs fair_share = True",
        ),
        ({"portal_weights": [("a", 2)]}, "MyConsumer.portal_weights must be a mapping"),
        ({"portal_weights": {"": 2}}, "MyConsumer.portal_weights has '': not a member_id"),
        ({"portal_weights": {"a": 0}}, "MyConsumer.portal_weights gives 'a' 0: a weight is"),
        ({"portal_weights": {"a": 101}}, "gives 'a' 101: a weight is an int from 1 to 100"),
        ({"max_attempts": 0}, "MyConsumer.max_attempts must be an int >= 1"),
        ({"retry_delays_s": ()}, "MyConsumer.retry_delays_s must be a non-empty tuple"),
        ({"retry_delays_s": (1, -1)}, "MyConsumer.retry_delays_s has -1"),
        ({"handle_timeout_s": 0}, "MyConsumer.handle_timeout_s must be positive"),
        ({"handle_timeout_s": float("nan")}, "MyConsumer.handle_timeout_s must be positive"),
    ],
)
def test_misconfiguration_names_class_and_attribute(attrs: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(**attrs).check()
    assert words in str(info.value)


def test_handle_must_be_implemented() -> None:
    cls = type("Lazy", (EventConsumer,), {"queue": "q", "events": ("ONX",)})
    with pytest.raises(ConfigError, match=r"Lazy\.handle is not implemented"):
        cls.check()
