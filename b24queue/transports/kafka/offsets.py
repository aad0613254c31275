"""What a Kafka consumer may commit: per partition, the offset of the lowest record read ahead
(`lanes`) or handed to a handler and not settled yet (or, with none open, the one after the last
record looked at).

Handlers finish out of order; committing the highest settled offset would skip an unfinished
record for good if the worker then crashed. So the commit point only moves over a contiguous
settled prefix. Records a queue is not routed to (its `to` header does not name it) are settled
as they are read. Records settled above the commit point (a lower one still open) are noted in
`<queue>.deliveries` (settled marks): a later owner passes over them instead of handing them
out again and counting them against the delivery limit. A partition's state is an object of its
own: a settlement that comes after the partition was revoked (and maybe assigned back) finds
another object and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass(slots=True, eq=False)
class Partition:
    """One assigned partition. `redeliver_below`: records under it may have been handed to a
    handler by an earlier owner (read from the handout group when assigned). `done`: records
    settled at or above the commit point (by this owner, or by an earlier one: `prior`)."""

    tp: TopicPartition
    next: int  # the offset after the last record looked at
    committed: int  # what the group has committed
    redeliver_below: int = 0
    handed: int = 0  # the offset after the last record handed to a handler
    handed_marked: int = 0  # what the handout group has committed
    pending: set[int] = field(default_factory=set)  # with a handler
    held: set[int] = field(default_factory=set)  # read ahead, in a lane: not handed yet
    done: set[int] = field(default_factory=set)
    prior: frozenset[int] = frozenset()  # settled by an earlier owner: passed over
    noted: frozenset[int] = frozenset()  # `done` as last written to the deliveries topic

    def hold(self, offset: int) -> None:
        """Read into its lane: it holds the commit point, it is not handed (nor marked)."""
        self.held.add(offset)
        self.next = max(self.next, offset + 1)

    def take(self, offset: int) -> None:
        """Handed to a handler (a lane hands its records out in offset order)."""
        self.held.discard(offset)
        self.pending.add(offset)
        self.next = max(self.next, offset + 1)
        self.handed = max(self.handed, offset + 1)

    def skip(self, offset: int) -> None:
        self.next = max(self.next, offset + 1)

    def settle(self, offset: int) -> None:
        if offset in self.pending:
            self.pending.discard(offset)
            self.done.add(offset)

    def pass_settled(self, offset: int) -> None:
        """A record an earlier owner settled: not handed out again, still noted as settled
        while a lower record holds the commit point."""
        self.next = max(self.next, offset + 1)
        self.done.add(offset)

    def to_note(self) -> frozenset[int] | None:
        """The records settled above the commit point, when they changed since last noted."""
        point = self.commit_point
        self.done = {o for o in self.done if o >= point}
        done = frozenset(self.done)
        return done if done and done != self.noted else None

    @property
    def commit_point(self) -> int:
        open_ = self.pending | self.held if self.held else self.pending
        return min(open_) if open_ else self.next

    def redelivered(self, offset: int) -> bool:
        return offset < self.redeliver_below


class Offsets:
    """The partitions a consumer owns now."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, Partition] = {}

    def assign(
        self, tp: TopicPartition, committed: int, handed: int, prior: Iterable[int] = ()
    ) -> Partition:
        part = Partition(tp, committed, committed, redeliver_below=max(handed, committed))
        part.prior = frozenset(o for o in prior if o >= committed)
        part.handed = part.handed_marked = max(handed, committed)
        self._parts[tp] = part
        return part

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._parts.pop(tp, None)

    def get(self, tp: TopicPartition) -> Partition | None:
        return self._parts.get(tp)

    def owns(self, part: Partition) -> bool:
        return self._parts.get(part.tp) is part

    def in_flight(self, tps: Iterable[TopicPartition]) -> int:
        return sum(len(p.pending) for tp in tps if (p := self._parts.get(tp)) is not None)

    def to_commit(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """The commit points that moved since the last commit."""
        parts = (
            self._parts.values()
            if tps is None
            else [self._parts[t] for t in tps if t in self._parts]
        )
        return {p.tp: p.commit_point for p in parts if p.commit_point != p.committed}

    def committed(self, points: dict[TopicPartition, int]) -> None:
        for tp, offset in points.items():
            if (part := self._parts.get(tp)) is not None:
                part.committed = offset

    def to_note(
        self, tps: Iterable[TopicPartition] | None = None
    ) -> dict[Partition, frozenset[int]]:
        parts = (
            self._parts.values()
            if tps is None
            else [self._parts[t] for t in tps if t in self._parts]
        )
        return {p: done for p in parts if (done := p.to_note()) is not None}

    def to_mark(self) -> dict[TopicPartition, int]:
        """Handout high-waters not yet committed to the handout group."""
        return {p.tp: p.handed for p in self._parts.values() if p.handed > p.handed_marked}

    def marked(self, points: dict[TopicPartition, int]) -> None:
        for tp, offset in points.items():
            if (part := self._parts.get(tp)) is not None:
                part.handed_marked = max(part.handed_marked, offset)
