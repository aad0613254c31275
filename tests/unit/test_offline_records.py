"""What event.offline.get answers, validated and bounded; the message of a record."""

from __future__ import annotations

import json
from typing import Any

import pytest

from b24queue.events import Event
from b24queue.events.envelope import envelope_for, token_digest
from b24queue.offline.records import (
    MAX_RECORDS,
    BadBatch,
    envelope_for_record,
    parse_batch,
    stable_message_id,
)
from tests.support.samples import SAMPLE_TOKEN, sample_decoded, token_keys


def row(i: int, **over: Any) -> dict[str, Any]:
    base = {
        "ID": str(i),
        "TIMESTAMP_X": "2026-11-29T23:00:00+03:00",
        "EVENT_NAME": "ONCRMDEALUPDATE",
        "EVENT_DATA": {"FIELDS": {"ID": str(i)}},
        "EVENT_ADDITIONAL": {"user_id": "1"},
        "MESSAGE_ID": f"msg{i}",
    }
    base.update(over)
    return base


def test_a_batch_is_parsed_and_bad_records_named() -> None:
    answer = {
        "process_id": "p1",
        "events": [
            row(1),
            row(2, EVENT_NAME="ON CRM.#"),
            row(3, EVENT_DATA={"x": "y" * 5000}),
            row(4, ID="not digits"),
            row(5, MESSAGE_ID="bad id\n"),
            row(1),  # the same record twice: once
            row(6, TIMESTAMP_X="x" * 100),
            "junk",
            row(7, EVENT_NAME="catalog.product.on.add"),
        ],
    }
    batch = parse_batch(answer, max_body_bytes=2048)
    assert [r.id for r in batch.records] == ["1", "7"]
    assert batch.records[1].event == "CATALOG.PRODUCT.ON.ADD"
    assert batch.bad == ["msg2", "msg3", "msg4", "msg6"]  # errored by MESSAGE_ID
    assert batch.unnamed == 2  # no usable MESSAGE_ID, or not a record: left reserved


@pytest.mark.parametrize(
    "answer",
    [[], "x", {"events": "x", "process_id": "p"}, {"events": [row(1)]}, {"process_id": "a b"}],
)
def test_an_unusable_answer_is_refused(answer: Any) -> None:
    if isinstance(answer, dict) and "events" not in answer:
        answer = {**answer, "events": [row(1)]}
    with pytest.raises(BadBatch):
        parse_batch(answer, 1024 * 1024)


def test_an_empty_queue_is_an_empty_batch() -> None:
    assert parse_batch({"process_id": "p", "events": []}, 1024).records == []
    assert parse_batch({"process_id": "p", "events": {}}, 1024).records == []
    keyed = parse_batch({"process_id": "p", "events": {"7": row(7)}}, 1024)
    assert [r.id for r in keyed.records] == ["7"]
    assert parse_batch({"events": []}, 1024).process_id == ""


def test_a_batch_is_capped() -> None:
    answer = {"process_id": "p", "events": [row(i) for i in range(1, MAX_RECORDS + 21)]}
    batch = parse_batch(answer, 1024 * 1024)
    assert len(batch.records) == MAX_RECORDS and batch.over == 20


def test_message_id_is_stable_per_reservation_and_apart_per_portal_and_change() -> None:
    (record,) = parse_batch({"process_id": "p", "events": [row(1)]}, 4096).records
    (later,) = parse_batch(
        {"process_id": "p", "events": [row(1, TIMESTAMP_X="2026-11-29T23:05:00+03:00")]}, 4096
    ).records
    same = stable_message_id("m1", "p", record)
    assert same == stable_message_id("m1", "p", record)  # a re-read after a crash
    assert same != stable_message_id("m2", "p", record)  # another portal's equal MESSAGE_ID
    assert same != stable_message_id("m1", "p", later)  # the object's next change
    assert same != stable_message_id("m1", "q", record)  # reserved again later


def test_the_message_of_a_record() -> None:
    (record,) = parse_batch({"process_id": "p7", "events": [row(3)]}, 4096).records
    envelope = envelope_for_record(record, "p7", "m1", "m1.bitrix24.com", token_digest("tok"))
    body = json.loads(envelope.body)
    assert (
        envelope.routing_key == "ONCRMDEALUPDATE" and envelope.headers["x-b24queue-offline"] == "1"
    )
    assert envelope.headers["x-b24-token-sha256"] == token_digest("tok")
    assert "tok" not in envelope.body.decode() and "tok" not in str(envelope.headers.values())
    assert body["ts"] == 1795982400  # TIMESTAMP_X in unix seconds
    event = Event.from_json(envelope.body)
    assert event.offline is not None and event.offline["process_id"] == "p7"
    assert event.data == {"FIELDS": {"ID": "3"}} and event.auth.member_id == "m1"


def test_a_record_keeps_no_application_token_at_any_depth() -> None:
    # A bot event's record as a portal could keep it: its data repeats the token, as the online
    # event does (data[BOT][<id>] and its [AUTH]); and whatever EVENT_ADDITIONAL holds.
    online = sample_decoded("imbot-message-add-group")
    data, additional = online["data"], {"auth": [{"application_token": SAMPLE_TOKEN}]}
    answer = {"process_id": "p", "events": [row(1, EVENT_DATA=data, EVENT_ADDITIONAL=additional)]}
    (record,) = parse_batch(answer, 2**20).records
    envelope = envelope_for_record(record, "p", "m1", "m1.bitrix24.com", token_digest("t"))
    assert SAMPLE_TOKEN.encode() not in envelope.body
    body = json.loads(envelope.body)
    assert token_keys(body) == 0 and body["data"]["PARAMS"] == data["PARAMS"]
    assert body["offline"]["additional"] == {"auth": [{}]}


def test_an_online_event_cannot_claim_to_be_offline() -> None:
    event = Event.from_payload({"event": "ONCRMDEALADD", "offline": {"id": "1"}, "data": {}})
    assert Event.from_json(envelope_for(event).body).offline is None


def nested(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value


def test_a_record_nested_past_the_limit_as_published_is_bad() -> None:
    # One level short of orjson's limit inside [data, additional], one level past it inside
    # the published body (body["offline"]["additional"]).
    deep = nested(253)
    batch = parse_batch({"process_id": "p1", "events": [row(1, EVENT_ADDITIONAL=deep)]}, 2**20)
    assert batch.records == [] and batch.bad == ["msg1"]
