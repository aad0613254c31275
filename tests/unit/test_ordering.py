"""Order within an entity (b24queue.ordering): the consumer's attributes, as `check()` takes or
refuses them; the key each event gets; a transport without ordered claims refuses a key."""

from __future__ import annotations

import json
from typing import Any

import pytest

from b24queue import Event, EventConsumer
from b24queue.errors import ConfigError
from b24queue.ordering import MAX_ORDER_KEY_CHARS, Ordering, as_key, path_reader
from b24queue.queues import spec_for
from b24queue.transports import OrdersByKey, check_fairness


def make(**attrs: Any) -> type[EventConsumer]:
    async def handle(self: EventConsumer, event: Event) -> None:
        return None

    body: dict[str, Any] = {"queue": "deals", "events": ("ONCRMDEALUPDATE",), "handle": handle}
    body.update(attrs)
    return type("MyConsumer", (EventConsumer,), body)


def body(fields: Any, member_id: str = "m1") -> bytes:
    payload = {"event": "ONCRMDEALUPDATE", "data": {"FIELDS": fields}, "auth": {"member_id": "x"}}
    payload["auth"] = {"member_id": member_id}
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"ordering_key": "data.FIELDS.ID"},
        {"ordering_key": "data.FIELDS.ID", "ordering": "lenient"},
        {"ordering_key": lambda event: event.data["FIELDS"]["ID"]},
        {"ordering_key": staticmethod(lambda event: None)},
        {"ordering_key": "data.FIELDS.ID", "coalesce": True},
    ],
)
def test_good_ordering_attributes_pass(attrs: dict[str, Any]) -> None:
    make(**attrs).check()


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ({"ordering_key": ""}, "MyConsumer.ordering_key must be a dotted path"),
        ({"ordering_key": "data..ID"}, "MyConsumer.ordering_key 'data..ID' has an empty step"),
        ({"ordering_key": "data.FIELDS.ID."}, "MyConsumer.ordering_key"),
        ({"ordering_key": "x" * 201}, "MyConsumer.ordering_key must be a dotted path"),
        ({"ordering_key": 42}, "MyConsumer.ordering_key must be a dotted path"),
        ({"ordering_key": ("data", "ID")}, "MyConsumer.ordering_key must be a dotted path"),
        ({"ordering": "loose"}, "MyConsumer.ordering must be 'strict' or 'lenient'"),
        ({"ordering": True}, "MyConsumer.ordering must be 'strict' or 'lenient'"),
        ({"coalesce": 1, "ordering_key": "data.ID"}, "MyConsumer.coalesce must be True or False"),
        ({"coalesce": True}, "MyConsumer.coalesce needs an ordering_key"),
    ],
)
def test_bad_ordering_attributes_are_refused_by_name(attrs: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match="^" + words.replace(".", r"\.").replace("(", r"\(")):
        make(**attrs).check()


def test_a_path_reads_the_event_and_a_missing_key_is_none() -> None:
    read = path_reader("data.FIELDS.ID")
    assert read(Event.from_json(body({"ID": "42"}))) == "42"
    assert read(Event.from_json(body({"ID": 42}))) == 42
    assert read(Event.from_json(body({}))) is None
    assert read(Event.from_json(body(["not", "a", "mapping"]))) is None


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("42", "42"),
        (42, "42"),
        (None, ""),
        ("", ""),
        (True, ""),
        ({"ID": 1}, ""),
        ([1], ""),
        ("x" * 500, "x" * MAX_ORDER_KEY_CHARS),
    ],
)
def test_what_a_key_becomes(value: object, key: str) -> None:
    assert as_key(value) == key


def test_a_group_is_the_portal_and_the_key() -> None:
    ordering = spec_for(make(ordering_key="data.FIELDS.ID")).ordering
    assert ordering.on and ordering.strict
    one = ordering.group("m1", body({"ID": "42"}))
    assert one == ordering.group("m1", body({"ID": 42}))  # an int is its digits
    assert one != ordering.group("m2", body({"ID": "42"}))  # another portal's deal 42
    assert ordering.group("m1", body({})) == ""  # no key: not ordered
    assert not spec_for(make()).ordering.on
    assert not spec_for(make(ordering_key="data.ID", ordering="lenient")).ordering.strict


@pytest.mark.parametrize("raw", ["4\x002", "4\ud8002", "\x00", "x" * 500 + "\x00"])
def test_a_key_no_database_stores_becomes_a_digest_of_all_of_it(raw: str) -> None:
    """A NUL (PostgreSQL's text refuses it) or a lone surrogate (not UTF-8: SQLite's driver
    refuses it): a digest, the same for the same key, another for another."""
    key = as_key(raw)
    assert key.startswith("sha256:") and len(key) == 71 and key == as_key(raw)
    assert key != as_key(raw + "3") and key.isascii()
    ordering = Ordering(lambda event: raw, True, "C")
    group = ordering.group("m1", body({}))
    assert group == ordering.group("m1", body({})) != ordering.group("m2", body({})) != ""
    group.encode("utf-8")
    assert "\x00" not in group


def test_a_portal_no_database_stores_gives_a_storable_group() -> None:
    ordering = spec_for(make(ordering_key="data.FIELDS.ID")).ordering
    group = ordering.group("m\x001", body({"ID": "42"}))
    assert group.startswith("sha256:") and group != ordering.group("m1", body({"ID": "42"}))


def test_a_key_function_that_fails_gives_no_key(caplog: pytest.LogCaptureFixture) -> None:
    def boom(event: Event) -> str:
        raise KeyError(event.data["secret"])

    ordering = Ordering(boom, True, "MyConsumer")
    assert ordering.group("m1", body({"secret": "s3cr3t"})) == ""
    assert ordering.group("m1", b"not an event") == ""
    assert "MyConsumer.ordering_key failed" in caplog.text
    assert "s3cr3t" not in caplog.text


class _Plain:
    name = "plain"


class _Ordered:
    name = "ordered"
    shares_by_portal = True
    orders_by_key = True


def test_a_transport_without_ordered_claims_refuses_a_key() -> None:
    keyed = make(ordering_key="data.FIELDS.ID")
    assert isinstance(_Ordered(), OrdersByKey)
    check_fairness(_Ordered(), [keyed])  # type: ignore[arg-type]
    check_fairness(_Plain(), [make()])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^MyConsumer\.ordering_key: the plain transport"):
        check_fairness(_Plain(), [keyed])  # type: ignore[arg-type]
