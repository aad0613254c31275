"""Kafka's side of b24queue: topic and group names, the clients, the record format, and the
translation of aiokafka's errors into `b24queue.errors`.

A record: value = the event's body; key = the portal's member_id, "" without one (its events
share a partition, so they keep their order, and one process's lanes hold them: `lanes`);
headers `m` message id, `k` routing key, `e` event type, `t` accepted at (ISO), `h` our headers
as JSON (types kept: the attempt is an int), and, on the events topic, `to` the consumer queues
the ingress routed it to and `b` the bindings it routed with (the bindings topic's offset it had
read to); on a retry topic, `due` (ms since the epoch).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as ke
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from b24queue import _constants as c
from b24queue.errors import BrokerUnavailableError, ConfigError
from b24queue.events.envelope import Envelope
from b24queue.settings import Settings
from b24queue.transports.kit.leased import Row

log = logging.getLogger(__name__)

# What means "Kafka is away (or not answering yet)": try again later.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    ke.KafkaConnectionError,
    ke.KafkaTimeoutError,
    ke.NodeNotReadyError,
    ke.NoBrokersAvailable,
    ke.RequestTimedOutError,
    ke.NotLeaderForPartitionError,
    ke.LeaderNotAvailableError,
    ke.UnknownTopicOrPartitionError,
    OSError,
)
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
H_TO, H_DUE = "to", "due"
H_BOUND = "b"  # the bindings topic's offset the ingress had read to when it routed the record
# How long the broker may hold a fetch that found nothing new. Kafka's 500 ms put 120-140 ms
# between accepted and handled here (the bench); 50 ms costs an idle consumer 20 fetches/s.
FETCH_WAIT_MS = 50
# On a rebalance, the handlers of partitions going away may finish within REVOKE_WAIT_S (else
# their records run again elsewhere); the group waits REBALANCE_TIMEOUT_S for a member to rejoin.
# The second must outlast the first plus the commit after it, with room: a member still in its
# revoke wait when the group stops waiting is dropped, its commit fails (CommitFailedError) and
# it rejoins, starting another rebalance. aiokafka would default it to the session timeout.
REVOKE_WAIT_S = 10.0
REBALANCE_TIMEOUT_S = max(60.0, REVOKE_WAIT_S + 30.0)


@dataclass(frozen=True, slots=True)
class Names:
    """The topics and groups of one b24queue namespace (the events topic's name)."""

    events: str
    unrouted: str

    @classmethod
    def of(cls, settings: Settings) -> Names:
        return cls(settings.exchange, settings.unrouted)

    @property
    def bindings(self) -> str:
        return f"{self.events}.bindings"

    @staticmethod
    def group(queue: str) -> str:
        return queue

    @staticmethod
    def handout_group(queue: str) -> str:
        """Commits, per partition, the offset after the last record handed to a handler: what a
        new owner reads below it may have been handled before (flagged redelivered)."""
        return f"{queue}.handout"


def check_topic(name: str) -> str:
    if not _TOPIC.match(name):
        raise ConfigError(f"{name!r} cannot be a Kafka topic: use letters, digits, '.', '_', '-'")
    return name


def translate(exc: BaseException, settings: Settings) -> BaseException:
    where = settings.redacted_broker_url()
    if isinstance(exc, ke.AuthenticationFailedError | ke.SaslAuthenticationFailed):
        return ConfigError(f"Kafka at {where} refused: {exc}")
    if isinstance(exc, UNAVAILABLE):
        return BrokerUnavailableError(f"cannot reach Kafka at {where}: {exc!r}")
    return exc


def _common(settings: Settings, name: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": name.replace(" ", "_")[:100],
        "request_timeout_ms": int(max(settings.connect_timeout_s, 5.0) * 1000),
    }


def producer(settings: Settings, name: str, *, idempotent: bool) -> AIOKafkaProducer:
    """`acks=all`: a send is acknowledged once every in-sync replica has it."""
    return AIOKafkaProducer(
        **_common(settings, name),
        acks="all",
        enable_idempotence=idempotent,
        linger_ms=0,  # what arrives while a request is out goes in the next one anyway
        max_request_size=16 * 1024 * 1024,
    )


def consumer(settings: Settings, name: str, group: str | None, **extra: Any) -> AIOKafkaConsumer:
    session_ms = int(settings.kafka_session_timeout_s * 1000)
    return AIOKafkaConsumer(
        **_common(settings, name),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_ms,
        rebalance_timeout_ms=int(REBALANCE_TIMEOUT_S * 1000),
        heartbeat_interval_ms=max(100, session_ms // 5),
        fetch_max_wait_ms=FETCH_WAIT_MS,
        **extra,
    )


def admin(settings: Settings, name: str) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**_common(settings, name))


def record_headers(
    envelope_like: Row | Envelope, headers: dict[str, Any], extra: Iterable[tuple[str, str]] = ()
) -> list[tuple[str, bytes]]:
    out = [
        ("m", envelope_like.message_id.encode()),
        ("k", envelope_like.routing_key.encode()),
        ("e", envelope_like.event_type.encode()),
        ("t", envelope_like.timestamp.isoformat().encode()),
        ("h", json.dumps(headers, default=str).encode()),
    ]
    out += [(k, v.encode()) for k, v in extra]
    return out


def key_of(headers: dict[str, Any]) -> bytes:
    """The portal's member_id; b"" without one: the events of no portal are one group too, in
    one partition (a null key would spread them over all of them, `lanes`)."""
    member = headers.get(c.H_MEMBER_ID)
    return str(member).encode() if member else b""


def header(record: ConsumerRecord[Any, Any], name: str) -> str | None:
    """Never raises: bytes that are not UTF-8 come out as U+FFFD (a `to` naming no queue)."""
    for k, v in record.headers or ():
        if k == name:
            return bytes(v).decode(errors="replace")
    return None


def targets(record: ConsumerRecord[Any, Any]) -> Sequence[str]:
    value = header(record, H_TO)
    if value and "\ufffd" in value:  # not written by b24queue: said, passed over if unnamed
        where = f"{record.topic}[{record.partition}] offset {record.offset}"
        log.warning("%s: its 'to' header is not UTF-8 (%r)", where, value[:200])
    return value.split(",") if value else ()


def due_ms(record: ConsumerRecord[Any, Any]) -> float:
    """A retry record's due time; ValueError when its `due` header is not a number."""
    value = header(record, H_DUE)
    return float(value) if value is not None else 0.0


def row_of(record: ConsumerRecord[Any, Any], deliveries: int = 1) -> Row:
    """The record as a row; ValueError (UnicodeDecodeError among them) when a header is not
    what b24queue writes: `malformed`, see `salvage`."""
    h = {k: bytes(v) for k, v in record.headers or ()}
    accepted = h.get("t")
    headers = json.loads(h["h"]) if "h" in h else {}
    if not isinstance(headers, dict):
        raise ValueError(f"header 'h' is not a JSON object: {type(headers).__name__}")
    return Row(
        id=record.offset,
        message_id=h.get("m", b"").decode(),
        routing_key=h.get("k", b"").decode(),
        body=bytes(record.value or b""),
        headers=headers,
        timestamp=datetime.fromisoformat(accepted.decode())
        if accepted
        else datetime.fromtimestamp(record.timestamp / 1000, UTC),
        event_type=h.get("e", b"").decode(),
        deliveries=deliveries,
        fence=deliveries,
    )


def salvage(record: ConsumerRecord[Any, Any], deliveries: int = 1) -> Row:
    """What can be read of a record `row_of` refused, to dead-letter it: never raises."""
    return Row(
        id=record.offset,
        message_id=header(record, "m") or "",
        routing_key=header(record, "k") or "",
        body=bytes(record.value or b""),
        headers={},
        timestamp=datetime.fromtimestamp(record.timestamp / 1000, UTC),
        event_type=header(record, "e") or "",
        deliveries=deliveries,
        fence=deliveries,
    )


def parse(
    record: ConsumerRecord[Any, Any], deliveries: int, *, retry: bool
) -> tuple[Row, ValueError | None]:
    """The record as a row, or, when it is not as b24queue writes it (a header not UTF-8, `h`
    not a JSON object, `t` not a time, a retry's `due` not a number), what can be read of it
    and why: it goes to the DLQ unread (`malformed`) instead of staying open for ever."""
    try:
        row = row_of(record, deliveries)
        if retry:
            due_ms(record)
    except ValueError as exc:
        return salvage(record, deliveries), exc
    return row, None


def due_or_now(record: ConsumerRecord[Any, Any]) -> float:
    """A `due` that is not a number is due now (and its handling dead-letters it)."""
    try:
        return due_ms(record)
    except ValueError:
        return 0.0


async def read_to_now(
    reader: AIOKafkaConsumer,
    tp: TopicPartition,
    read: Callable[[ConsumerRecord[Any, Any]], None],
) -> None:
    """Read `tp` from the reader's position to where it ended when this began, so a topic that
    keeps growing is still read to an end. Past the end offset too, but only records written
    before this began (their timestamps): Tansu 0.6 reports too low an end offset once one
    request carried several records. The first record written later is left for the next read."""
    began_ms = time.time() * 1000
    end = (await reader.end_offsets([tp]))[tp]
    while True:
        behind = await reader.position(tp) < end
        found = (await reader.getmany(tp, timeout_ms=1000 if behind else 200)).get(tp, [])
        if not found and not behind:
            return
        for record in found:
            if record.offset >= end and record.timestamp > began_ms:
                reader.seek(tp, record.offset)
                return
            read(record)
