"""What `event.offline.get` answers, validated and bounded before anything reaches a message, a
header, a log line or a loop; and the message each record becomes.

Bitrix24 answers `{"process_id": "...", "events": [{"ID", "TIMESTAMP_X", "EVENT_NAME",
"EVENT_DATA", "EVENT_ADDITIONAL", "MESSAGE_ID"}, ...]}`. A portal could answer anything: more
records than asked, huge data, names that are no routing key. A record we cannot publish but can
name (its MESSAGE_ID) is marked with event.offline.error; one we cannot even name stays reserved
(never cleared, so never lost) and is counted.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from b24queue import _constants as c
from b24queue.events.envelope import Envelope, holds_token_key, without_tokens
from b24queue.events.event import EVENT_NAME, MAX_EVENT_NAME

H_OFFLINE = "x-b24queue-offline"  # "1" on every message pulled from an offline queue
H_OFFLINE_MESSAGE_ID = "x-b24-offline-message-id"

MAX_RECORDS = 1000  # whatever a portal answers, one batch is at most this many records
_ID = re.compile(r"[0-9]{1,20}")
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_PROCESS_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_TIMESTAMP = 64


class BadBatch(ValueError):
    """The answer as a whole is unusable (no process_id, no list of events)."""


@dataclass(frozen=True, slots=True)
class OfflineRecord:
    id: str
    message_id: str  # Bitrix24's MESSAGE_ID: names the object's record for clear / error
    event: str
    timestamp: str
    data: Any = field(repr=False)
    additional: Any = field(repr=False)


@dataclass(slots=True)
class Batch:
    process_id: str
    records: list[OfflineRecord]
    bad: list[str]  # MESSAGE_IDs of records that cannot be published (to event.offline.error)
    unnamed: int  # records with no usable ID or MESSAGE_ID: left reserved, counted
    over: int  # records past MAX_RECORDS: left reserved, read again later


def valid_process_id(value: Any) -> str | None:
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    return text if _PROCESS_ID.fullmatch(text) else None


def parse_batch(result: Any, max_body_bytes: int) -> Batch:
    if not isinstance(result, dict):
        raise BadBatch("event.offline.get answered something else than an object")
    process_id = valid_process_id(result.get("process_id"))
    events = _events(result.get("events"))
    if process_id is None:
        if not events:
            return Batch("", [], [], 0, 0)
        raise BadBatch("event.offline.get: records without a usable process_id")
    batch = Batch(process_id, [], [], 0, max(0, len(events) - MAX_RECORDS))
    seen: set[str] = set()
    for raw in events[:MAX_RECORDS]:
        record, message_id = _record(raw, max_body_bytes, process_id)
        if record is not None and record.id not in seen:
            seen.add(record.id)
            batch.records.append(record)
        elif record is None and message_id is not None:
            batch.bad.append(message_id)
        elif record is None:
            batch.unnamed += 1
    return batch


def _events(events: Any) -> list[Any]:
    if events is None:
        return []
    if isinstance(events, dict):  # PHP's array with keys of its own, as JSON: its values
        return list(events.values())
    if not isinstance(events, list):
        raise BadBatch("event.offline.get: `events` is not a list")
    return events


def _record(
    raw: Any, max_body_bytes: int, process_id: str
) -> tuple[OfflineRecord | None, str | None]:
    """(the record, None), or (None, its MESSAGE_ID if usable) when it cannot be published."""
    if not isinstance(raw, dict):
        return None, None
    record_id = _text(raw.get("ID"))
    message_id = _text(raw.get("MESSAGE_ID"))
    if not (_ID.fullmatch(record_id) and _MESSAGE_ID.fullmatch(message_id)):
        return None, message_id if _MESSAGE_ID.fullmatch(message_id) else None
    name = _text(raw.get("EVENT_NAME"))
    timestamp = _text(raw.get("TIMESTAMP_X"))
    if len(name) > MAX_EVENT_NAME or not EVENT_NAME.fullmatch(name):
        return None, message_id
    if len(timestamp) > MAX_TIMESTAMP or not timestamp.isprintable():
        return None, message_id
    data, additional = raw.get("EVENT_DATA"), raw.get("EVENT_ADDITIONAL")
    record = OfflineRecord(record_id, message_id, name.upper(), timestamp, data, additional)
    try:
        # The body as it will be published (its nesting is what orjson limits), less the
        # portal's domain and member_id (a few bytes, bounded by the ingress's own checks).
        size = len(_serialised(_body(record, process_id, "", "")))
    except TypeError:  # orjson.JSONEncodeError: nested too deep, a number too large...
        return None, message_id
    if size > max_body_bytes:
        return None, message_id
    return record, None


def _text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return ""
    return str(value)


def stable_message_id(member_id: str, process_id: str, record: OfflineRecord) -> str:
    """The same record read again under the same reservation (re-read after a crash) gets the
    same message_id, so the consumers' duplicate guard can drop the repeat. Not MESSAGE_ID alone:
    the portal keeps one record per object, so a later change of the object comes back with the
    same MESSAGE_ID (and ID), under a new reservation; two portals can have equal ones too. So:
    portal, reservation, record, and its TIMESTAMP_X."""
    key = "\0".join((member_id, process_id, record.id, record.message_id, record.timestamp))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def envelope_for_record(
    record: OfflineRecord, process_id: str, member_id: str, domain: str, digest: str
) -> Envelope:
    """The message of one record: routed by its event name like an online event, the record's
    fields in `data`, and `offline` saying where it came from (no token anywhere: none is added,
    and `application_token` keys the record holds are left out). TypeError
    (orjson.JSONEncodeError) if it cannot be serialised."""
    headers = {
        c.H_DOMAIN: domain,
        c.H_MEMBER_ID: member_id,
        H_OFFLINE: "1",
        H_OFFLINE_MESSAGE_ID: record.message_id,
        # As the ingress sets it: the record came from the portal through its own credentials,
        # so handlers may call the portal back for it.
        c.H_TOKEN_DIGEST: digest,
    }
    return Envelope(
        message_id=stable_message_id(member_id, process_id, record),
        routing_key=record.event,
        body=_serialised(_body(record, process_id, member_id, domain)),
        headers=headers,
        timestamp=datetime.now(UTC),
        event_type=record.event,
    )


def _body(record: OfflineRecord, process_id: str, member_id: str, domain: str) -> dict[str, Any]:
    return {
        "event": record.event,
        "data": record.data,
        "ts": _unix(record.timestamp),
        "auth": {"domain": domain, "member_id": member_id},
        "offline": {
            "id": record.id,
            "message_id": record.message_id,
            "process_id": process_id,
            "timestamp": record.timestamp,
            "additional": record.additional,
        },
    }


def _serialised(body: dict[str, Any]) -> bytes:
    """orjson's JSON of `body`, less every token at any depth, as an online event's
    (`envelope.message_body`): a record's data is the event's, and bot events repeat the tokens."""
    serialised = orjson.dumps(body)
    if holds_token_key(serialised):
        serialised = orjson.dumps(without_tokens(body))
    return serialised


def _unix(timestamp: str) -> int | None:
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = int(moment.timestamp())
    return seconds if 0 <= seconds <= 2**53 else None
