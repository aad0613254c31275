from __future__ import annotations

import json

import pytest

from b24queue.envelope import envelope_for
from b24queue.errors import BadEventError
from b24queue.events import FORM_TYPE, JSON_TYPE, Event, parse_event
from tests.conftest import (
    SAMPLE_NAMES,
    SAMPLE_TOKEN,
    sample_decoded,
    sample_form,
    sample_json,
    sample_published,
)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_samples_give_typed_access(name: str) -> None:
    event = parse_event(FORM_TYPE, sample_form(name))
    raw = sample_decoded(name)
    assert event.name == raw["event"]
    assert event.ts == int(raw["ts"])
    assert event.auth.domain == "acme.bitrix24.com"
    assert event.auth.member_id == "5f2a9c3e1b7d4a6f8e0c2b4d6f8a0c1e"
    assert event.data == raw["data"]
    assert event.payload == raw


def test_repr_never_shows_tokens() -> None:
    for name in SAMPLE_NAMES:
        event = parse_event(FORM_TYPE, sample_form(name))
        text = repr(event) + str(event) + repr(event.auth)
        assert SAMPLE_TOKEN not in text
        assert "b7c6e8f1a2d34e5f9a0b1c2d3e4f5a6b" not in text  # access token
        assert "a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1" not in text  # refresh token


def test_event_name_is_upper_cased_and_checked() -> None:
    event = Event.from_payload({"event": "onCrmDealAdd"})
    assert event.name == event.routing_key == "ONCRMDEALADD"
    for bad in ("", "ON#", "*", "1ABC", "A" * 200, "ON.", ".ON", "A..B", "A.*", "A.#", "ONX\n"):
        with pytest.raises(BadEventError) as info:
            Event.from_payload({"event": bad})
        assert info.value.field == "event"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "event: is required"),
        ({"event": "ONX", "ts": "soon"}, "ts: "),
        ({"event": "ONX", "auth": "nope"}, "auth: "),
        ({"event": "ONX", "auth": {"domain": ["x"]}}, "auth[domain]: "),
    ],
)
def test_validation_errors_name_the_field(payload: dict[str, object], message: str) -> None:
    with pytest.raises(BadEventError, match=r"^" + message.replace("[", r"\[").replace("]", r"\]")):
        Event.from_payload(payload)


def test_json_body_of_the_same_shape() -> None:
    raw = sample_json("crm-deal-add")
    event = parse_event(f"{JSON_TYPE}; charset=utf-8", json.dumps(raw).encode())
    assert event.payload == raw


def test_envelope_carries_the_exact_body_and_portal_headers() -> None:
    event = parse_event(FORM_TYPE, sample_form("imbot-message-add"))
    env = envelope_for(event)
    assert json.loads(env.body) == sample_published("imbot-message-add")
    assert SAMPLE_TOKEN not in env.body.decode()
    assert env.routing_key == "ONIMBOTMESSAGEADD"
    assert env.headers == {
        "x-b24-domain": "acme.bitrix24.com",
        "x-b24-member-id": "5f2a9c3e1b7d4a6f8e0c2b4d6f8a0c1e",
        "x-b24-event-handler-id": "77",
    }
    assert len(env.message_id) == 32
    assert envelope_for(event).message_id != env.message_id
