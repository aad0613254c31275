from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pytest

from b24queue.errors import BadEventError
from b24queue.events.envelope import envelope_for, message_body, new_message_id
from b24queue.events.event import FORM_TYPE, JSON_TYPE, Event, parse_event
from b24queue.events.forms import MAX_DEPTH
from tests.support.samples import (
    SAMPLE_NAMES,
    SAMPLE_TOKEN,
    sample_decoded,
    sample_form,
    sample_json,
    sample_published,
    token_keys,
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
        # What the worker's portal client checks the event's portal by (the body has no token).
        "x-b24-token-sha256": hashlib.sha256(SAMPLE_TOKEN.encode()).hexdigest(),
    }
    assert len(env.message_id) == 32
    assert envelope_for(event).message_id != env.message_id


def _as_before(payload: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The body as it always was made: the standard library's compact UTF-8 JSON."""

    def refuse(value: object) -> bytes:
        raise TypeError("the fast path is off")

    with monkeypatch.context() as patch:
        patch.setattr("b24queue.events.envelope.orjson.dumps", refuse)
        return message_body(payload)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_the_body_is_byte_for_byte_what_it_was(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for event in (
        parse_event(FORM_TYPE, sample_form(name)),
        parse_event(JSON_TYPE, json.dumps(sample_json(name)).encode()),
    ):
        body = message_body(event.payload)
        assert body == _as_before(event.payload, monkeypatch)
        assert (
            body == json.dumps(json.loads(body), ensure_ascii=False, separators=(",", ":")).encode()
        )
        assert SAMPLE_TOKEN.encode() not in body


@pytest.mark.parametrize(
    "data",
    [
        {"text": 'quotes " and \\ backslash\n\t\x00\x1f\x7f \u2028 \U0001f600 \u00fc'},
        {"n": None, "t": True, "f": False, "i": -12, "x": 1.5, "l": [1, "2", [None]]},
        {"nullable": "null", "big": 2**70},  # past 64 bits: the exact path
        {"2": "a key that looks like a number", "deep": {"a": {"b": {"c": []}}}},
    ],
)
def test_the_body_of_any_json_value_is_the_same_as_before(
    data: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = {"event": "ONX", "data": data}
    assert message_body(payload) == _as_before(payload, monkeypatch)
    assert json.loads(message_body(payload)) == payload


def test_floats_keep_their_value() -> None:
    payload = {
        "event": "ONX",
        "data": {"x": [1e-05, 1e16, 5e-324, -0.0, 0.1, 1.7976931348623157e308]},
    }
    assert json.loads(message_body(payload)) == payload


@pytest.mark.parametrize("number", [float("nan"), float("inf"), -float("inf")])
def test_a_number_that_is_not_json_is_still_refused(number: float) -> None:
    with pytest.raises(BadEventError, match="not JSON"):
        message_body({"event": "ONX", "data": {"deep": [{"x": number}]}})


def _token_everywhere(token: str) -> dict[str, Any]:
    """A payload with an application_token at every kind of place: dicts in dicts, lists of
    dicts, dicts in lists in lists, beside values that must stay."""
    return {
        "event": "ONX",
        "data": {
            "BOT": {"539": {"application_token": token, "AUTH": {"application_token": token}}},
            "bot": {"id": "456", "auth": {"user_id": "27", "application_token": token}},
            "list": [
                {"application_token": token, "keep": "a"},
                "x",
                [{"application_token": token}],
            ],
            "text": f'a string that says "application_token":"{token}"',
            "application_token_hint": "application_token",
            "untouched": {"deep": [{"k": "v"}]},
        },
        "extra": [[{"x": {"application_token": token}}]],
        "auth": {"domain": "acme.bitrix24.com", "application_token": token},
    }


@pytest.mark.parametrize("exact", [False, True])
def test_the_application_token_is_left_out_at_any_depth(
    exact: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "t0ken-" + "9" * 26
    payload = _token_everywhere(token)
    if exact:  # a null (or a number past 64 bits) takes the exact path: the same holds there
        payload["data"]["none"] = None
    before = json.dumps(payload)
    body = message_body(payload)
    published = json.loads(body)
    assert token_keys(published) == 0
    assert body.count(token.encode()) == 1  # only inside the message text, which is data
    data = published["data"]
    assert data["BOT"] == {"539": {"AUTH": {}}}
    assert data["bot"] == {"id": "456", "auth": {"user_id": "27"}}
    assert data["list"] == [{"keep": "a"}, "x", [{}]]
    assert published["extra"] == [[{"x": {}}]]
    assert published["auth"] == {"domain": "acme.bitrix24.com"}
    assert data["application_token_hint"] == "application_token"
    assert data["untouched"] == {"deep": [{"k": "v"}]}
    assert json.dumps(payload) == before  # the event itself is untouched
    assert body == _as_before(published, monkeypatch)  # and the body is as any other's


def test_only_what_leads_to_a_token_is_copied() -> None:
    from b24queue.events.envelope import without_tokens

    payload = _token_everywhere("tok")
    stripped = without_tokens(payload)
    assert stripped["data"]["untouched"] is payload["data"]["untouched"]
    assert stripped["data"]["list"][0] is not payload["data"]["list"][0]
    clean = {"event": "ONX", "data": {"a": [{"b": "c"}]}}
    assert without_tokens(clean) is clean


def test_a_token_at_the_deepest_level_the_decoder_allows() -> None:
    key = "data" + "[a]" * (MAX_DEPTH - 1) + "[application_token]"
    event = parse_event(FORM_TYPE, f"event=ONX&{key}={SAMPLE_TOKEN}".encode())
    assert SAMPLE_TOKEN.encode() not in message_body(event.payload)


def test_message_ids_are_uuid4_hex(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw in (bytes(16), b"\xff" * 16, bytes(range(16)), bytes(range(100, 116))):
        monkeypatch.setattr("os.urandom", lambda n, raw=raw: raw)
        assert new_message_id() == uuid.UUID(bytes=raw, version=4).hex
    monkeypatch.undo()
    ids = {new_message_id() for _ in range(100)}
    assert len(ids) == 100 and all(uuid.UUID(i).version == 4 for i in ids)


def test_delivery_facts_and_payload_travel_with_the_event() -> None:
    """They are not fields: kept beside them, through copies and pickling, as before."""
    import pickle
    from datetime import UTC, datetime

    from b24queue.events.event import mark_delivered

    raw = json.dumps(sample_json("crm-deal-add")).encode()
    fresh = Event.from_json(raw)
    assert (fresh.message_id, fresh.attempt, fresh.redelivered, fresh.accepted_at) == (
        None,
        1,
        False,
        None,
    )
    event = Event.from_json(raw)
    at = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    mark_delivered(event, "m-1", 3, True, at)
    assert fresh.message_id is None  # nothing shared between two events
    for twin in (event.model_copy(), pickle.loads(pickle.dumps(event))):
        assert (twin.message_id, twin.attempt, twin.redelivered, twin.accepted_at) == (
            "m-1",
            3,
            True,
            at,
        )
        assert twin == event  # (before payload is decoded on one of them: it is compared too)
        assert twin.payload == sample_json("crm-deal-add")
    assert Event.model_construct(name="ONX").attempt == 1
    assert Event.from_payload({"event": "onx", "data": {"A": "1"}}).payload["data"] == {"A": "1"}
