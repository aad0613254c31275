"""Coalescing on SQLite's queue, claim by claim: a delivery that replaces earlier events is
handled whatever the idempotency guard says of its latest (their ack settles the replaced ones),
and a coalesced retry keeps the group's attempt count when a newer event joins it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from b24queue import Event, EventConsumer
from b24queue import _constants as c
from b24queue.delivery import Incoming, decide
from b24queue.events.envelope import envelope_for
from b24queue.idempotency import MemorySeenStore
from b24queue.ordering import Ordering, path_reader
from b24queue.testing import make_event
from b24queue.transports.sqlite import db as sqlite_db
from b24queue.transports.sqlite import queue as q

Q = "coal.q"


def _publish(db, seq: str) -> None:
    q.publish(
        db,
        [envelope_for(make_event("ONCRMDEALUPDATE", {"FIELDS": {"ID": "42", "SEQ": seq}}))],
        "b24.unrouted",
    )


def _incoming(row) -> Incoming:
    return Incoming(
        body=row.body,
        message_id=row.message_id,
        routing_key=row.routing_key,
        headers=row.headers,
        redelivered=row.deliveries > 1,
        accepted_at=row.timestamp,
        replaces=tuple(r.message_id for r in row.replaced),
        handle=row,
    )


def test_a_coalesced_delivery_whose_latest_was_seen_is_handled_for_the_earlier_event(
    tmp_path: Path,
) -> None:
    """Lenient + coalesce + idempotency: P passes r0 (waiting for its retry) and is handled and
    remembered, but its ack never lands (worker SIGKILLed after the handler returned). When r0
    comes due, the claim coalesces r0 into P: the guard must not call the delivery a duplicate
    (its ack would delete r0, never handled): the handler runs on P with r0 in its replaces."""
    handled: list[str] = []
    store = MemorySeenStore()

    class C(EventConsumer):
        queue = Q
        events = ("#",)
        ordering_key = "data.FIELDS.ID"
        ordering = "lenient"
        coalesce = True
        idempotency = store

        async def handle(self, event: Event) -> None:
            handled.append(event.data["FIELDS"]["SEQ"] + "<" + ",".join(event.replaces))

    ordering = Ordering(path_reader("data.FIELDS.ID"), False, "C", coalesce=True)
    db = sqlite_db.connect(tmp_path / "q.sqlite3")
    db.isolation_level = None
    try:
        q.declare(db, Q, Q + ".dlq", ("#",))
        _publish(db, "0")
        [r0] = q.claim(db, Q, "w1", 1, 60.0, None, ordering)
        # r0's handler failed: retried in 0.3 s
        assert q.move(db, r0, "w1", queue=Q, headers={c.H_ATTEMPT: 2}, delay_s=0.3)
        _publish(db, "1")
        # P passes r0 (lenient), handled by w2 which is SIGKILLed before its ack: its lease is
        # already over here (lease -1 s) and its message_id is remembered.
        [p] = q.claim(db, Q, "w2", 1, -1.0, None, ordering)
        assert p.replaced == ()
        asyncio.run(store.remember(f"{Q}:{p.message_id}"))
        handled.append("1<")  # w2's handler ran P
        time.sleep(0.35)  # r0 is due
        [d] = q.claim(db, Q, "w3", 1, 60.0, None, ordering)
        assert d.message_id == p.message_id and [r.message_id for r in d.replaced] == [
            r0.message_id
        ]
        outcome = asyncio.run(decide(C(), _incoming(d), Q))
        assert outcome.kind == "ack"
        assert q.ack(db, d, "w3")
        left = q.depth(db, Q) + q.depth(db, Q + ".dlq")
    finally:
        db.close()
    # r0 settled as handled only by a handler call on the delivery that replaces it (P, the
    # latest, with r0 among its `replaces`): not by the guard's "duplicate".
    assert handled == ["1<", f"1<{r0.message_id}"], (handled, outcome.reason, left)
    assert outcome.reason is None and left == 0


def test_a_coalesced_retry_keeps_its_attempt_count_when_a_newer_event_joins(
    tmp_path: Path,
) -> None:
    """Strict + coalesce: the delivery (r0+r1, r1 handed) fails and is retried (attempt 2 on
    r1); a newer event r2 arrives meanwhile; the retry's delivery hands over r2 with attempt 1:
    the failing key's attempts start again, so max_attempts / max_deliveries never end it while
    events keep arriving (until 100 are coalesced)."""
    ordering = Ordering(path_reader("data.FIELDS.ID"), True, "C", coalesce=True)
    db = sqlite_db.connect(tmp_path / "q.sqlite3")
    db.isolation_level = None
    try:
        q.declare(db, Q, Q + ".dlq", ("#",))
        _publish(db, "0")
        _publish(db, "1")
        [d1] = q.claim(db, Q, "w", 5, 60.0, None, ordering)
        assert len(d1.replaced) == 1 and _incoming(d1).attempt == 1
        assert q.move(db, d1, "w", queue=Q, headers={c.H_ATTEMPT: 2}, delay_s=0.1)
        _publish(db, "2")
        time.sleep(0.15)
        [d2] = q.claim(db, Q, "w", 5, 60.0, None, ordering)
    finally:
        db.close()
    assert len(d2.replaced) == 2
    assert _incoming(d2).attempt == 2, _incoming(d2).attempt


def test_strict_a_replayed_dead_letter_coalesced_into_a_seen_latest_is_handled(
    tmp_path: Path,
) -> None:
    """Strict + coalesce + idempotency: r0 dead-lettered; P (accepted after) handled and
    remembered, its ack lost (SIGKILL); the operator replays r0: it comes back with its DLQ
    row's id, before P's; the claim coalesces it into P: the handler runs on it (the guard
    calling P a duplicate would have the ack delete the replayed r0 unhandled)."""
    handled: list[str] = []
    store = MemorySeenStore()

    class C(EventConsumer):
        queue = Q
        events = ("#",)
        ordering_key = "data.FIELDS.ID"
        coalesce = True
        idempotency = store

        async def handle(self, event: Event) -> None:
            handled.append(event.data["FIELDS"]["SEQ"] + "<" + ",".join(event.replaces))

    ordering = Ordering(path_reader("data.FIELDS.ID"), True, "C", coalesce=True)
    db = sqlite_db.connect(tmp_path / "q.sqlite3")
    db.isolation_level = None
    try:
        q.declare(db, Q, Q + ".dlq", ("#",))
        _publish(db, "0")
        [r0] = q.claim(db, Q, "w1", 1, 60.0, None, ordering)
        assert q.move(db, r0, "w1", queue=Q + ".dlq", headers={})
        _publish(db, "1")
        [p] = q.claim(db, Q, "w2", 1, -1.0, None, ordering)  # SIGKILLed before its ack
        asyncio.run(store.remember(f"{Q}:{p.message_id}"))
        handled.append("1<")
        [dead] = q.first(db, Q + ".dlq", 10)
        assert q.replay(db, dead, {}, Q, "b24.unrouted", Q + ".dlq")
        [d] = q.claim(db, Q, "w3", 1, 60.0, None, ordering)
        assert d.message_id == p.message_id and len(d.replaced) == 1
        outcome = asyncio.run(decide(C(), _incoming(d), Q))
        assert q.ack(db, d, "w3")
        left = q.depth(db, Q) + q.depth(db, Q + ".dlq")
    finally:
        db.close()
    assert handled == ["1<", f"1<{dead.message_id}"], (handled, outcome.reason, left)
    assert outcome.reason is None and left == 0
