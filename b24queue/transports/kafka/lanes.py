"""Which record a Kafka runner hands to its next free handler slot (docs/fairness.md).

Each assigned partition is a *lane*: the records read from it and not handed out yet, in offset
order; at most `READ_AHEAD` records or `READ_AHEAD_BYTES` of bodies before its fetch is paused,
so a flooded partition fills neither the process's memory nor its slots. A lane hands its
records out in offset order only: the handout mark stays exact (everything under it was
handed, see `offsets`), and a later owner never counts a record that never reached a handler
against `max_deliveries`.

With the fair share on, a free slot goes to the lane whose head record's portal (the record's
key: the member_id) has the smallest start, `max(pass, clock)`, as in `kit.fair`: start-time
fair queuing, the portal's pass moving on by `1 / weight` per slot it takes, the clock to the
start of the last slot given, a portal coming back starting at the clock (no credit for time
away); ties go to the record read first. A portal at `max_in_flight_per_portal` in this process
takes no slot (its lanes wait). The publisher keys records by portal, so a portal's events are
in one partition of the events topic, and its retries in the partition of that number of each
retry topic (as many partitions), which the group's range assignor gives to the same member:
a portal is in one process's lanes. Portals that hash to one partition share its lane, in
offset order. Off: the lane whose head was read first.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from b24queue.queues import Fairness

READ_AHEAD = 200  # records read ahead per partition before its fetch pauses
READ_AHEAD_BYTES = 1024 * 1024  # or this much of their bodies (a fetch may add one more batch)


def portal_of(record: ConsumerRecord[Any, Any]) -> str:
    """The record's key: the member_id the publisher keyed it by ("" without one)."""
    key = record.key
    return bytes(key).decode(errors="replace") if key else ""


@dataclass(slots=True, eq=False)
class Lane:
    tp: TopicPartition
    records: deque[tuple[int, ConsumerRecord[Any, Any]]] = field(default_factory=deque)
    size: int = 0  # bytes of the bodies held

    @property
    def full(self) -> bool:
        return len(self.records) >= READ_AHEAD or self.size >= READ_AHEAD_BYTES


class Lanes:
    """The lanes of one runner, the portals' turns, and each portal's handlers in flight here."""

    def __init__(self, fairness: Fairness) -> None:
        self._fairness = fairness
        self._lanes: dict[TopicPartition, Lane] = {}
        self._ready: dict[TopicPartition, Lane] = {}  # those with records
        self._passes: dict[str, float] = {}
        self._clock = 0.0
        self._seq = 0  # arrival order (the heads' order with the fair share off)
        self.in_flight: Counter[str] = Counter()

    def add(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> bool:
        """Records read from `tp`, in offset order. True when its lane is full (pause it)."""
        lane = self._lanes.setdefault(tp, Lane(tp))
        for record in records:
            self._seq += 1
            lane.records.append((self._seq, record))
            lane.size += len(record.value or b"")
        if lane.records:
            self._ready[tp] = lane
        return lane.full

    def drop(self, tps: set[TopicPartition]) -> None:
        """Revoked: what their lanes held is read again by the next owner (never handed)."""
        for tp in tps:
            self._lanes.pop(tp, None)
            self._ready.pop(tp, None)

    def full(self, tp: TopicPartition) -> bool:
        lane = self._lanes.get(tp)
        return lane is not None and lane.full

    def waiting(self) -> int:
        return sum(len(lane.records) for lane in self._ready.values())

    def next(self) -> tuple[TopicPartition, ConsumerRecord[Any, Any]] | None:
        """The record the next free slot takes (counted in flight for its portal), or None."""
        fair = self._fairness
        best: tuple[float, int, Lane, str] | None = None
        for lane in self._ready.values():
            seq, record = lane.records[0]
            portal = portal_of(record)
            if not fair.on:
                start = 0.0
            elif fair.cap is not None and self.in_flight[portal] >= fair.cap:
                continue
            else:
                start = max(self._passes.get(portal, self._clock), self._clock)
            if best is None or (start, seq) < best[:2]:
                best = (start, seq, lane, portal)
        if best is None:
            return None
        start, _, lane, portal = best
        _, record = lane.records.popleft()
        lane.size -= len(record.value or b"")
        if not lane.records:
            del self._ready[lane.tp]
        if fair.on:
            self._clock = max(self._clock, start)
            self._passes[portal] = start + 1 / fair.weight(portal)
            if len(self._passes) > 4 * len(self._lanes) + 100:  # those at the clock or behind
                self._passes = {p: v for p, v in self._passes.items() if v > self._clock}
        self.in_flight[portal] += 1
        return lane.tp, record

    def done(self, record: ConsumerRecord[Any, Any]) -> None:
        """Its handler ended (settled or not)."""
        portal = portal_of(record)
        self.in_flight[portal] -= 1
        if self.in_flight[portal] <= 0:
            del self.in_flight[portal]
