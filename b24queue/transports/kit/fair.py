"""Fair share at the claim, for a queue kept in database rows (SQLite, PostgreSQL): which rows a
claim of `count` handler slots takes, portal by portal (docs/fairness.md). No I/O here: the
transport reads the state, asks the rows each portal can give (`Claim.wanted` / `Claim.found`),
and writes the turns back, all in the claim's one transaction. `Waiting` applies the same rule to
the deliveries one worker process holds (RabbitMQ's shard queues).

The rule is start-time fair queuing, at the portal's grain: each portal with events in the queue
has a `pass` (its virtual time; kept per queue and portal in the database, so every worker
process shares it), and the queue a `clock` (the start of the last slot given). A slot goes to
the portal whose start, `max(pass, clock)`, is the smallest; that portal's pass then moves on by
`1 / weight`. A portal that had nothing waiting starts at the clock: it is served at the next
turn, and it gets no credit for the time it was away. Ties go to the portal whose name sorts
first. A portal at its cap (`Fairness.cap` events in handlers, across workers) takes no slot.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from b24queue.queues import Fairness


@dataclass(frozen=True, slots=True)
class Turns:
    """What a claim gave: slots per portal, the portals' passes after it, the queue's clock."""

    taken: dict[str, int]
    passes: dict[str, float]
    clock: float


def share(
    count: int,
    portals: Iterable[str],
    passes: Mapping[str, float],
    clock: float,
    fairness: Fairness,
    room: Mapping[str, int],
) -> Turns:
    """Give `count` slots among `portals` (those with events in the queue) by their starts.
    `room`: at most how many more a portal may take (its cap less its events in handlers, or
    what it has due); absent: no limit."""
    heap = [(max(passes.get(p, clock), clock), p) for p in portals if room.get(p, count) > 0]
    heapq.heapify(heap)
    taken: dict[str, int] = {}
    new_passes: dict[str, float] = {}
    given = 0
    while heap and given < count:
        start, portal = heapq.heappop(heap)
        clock = max(clock, start)
        n = taken[portal] = taken.get(portal, 0) + 1
        given += 1
        new_passes[portal] = start + 1 / fairness.weight(portal)
        if n < room.get(portal, count):
            heapq.heappush(heap, (new_passes[portal], portal))
    return Turns(taken, new_passes, clock)


class Claim:
    """One fair claim's plan. The transport asks `wanted()` for the portals to read and how many
    due, free rows of each (its oldest first), tells `found()` what each gave, and repeats until
    `wanted()` is empty; then `ids()` are the rows to lease and `turns` what to write back. Only
    portals that win a slot are read: a capped portal's backlog is not read at all."""

    def __init__(
        self,
        count: int,
        portals: Iterable[str],
        passes: Mapping[str, float],
        clock: float,
        fairness: Fairness,
        leased: Mapping[str, int],
    ) -> None:
        self._count = count
        self._portals = list(portals)
        self._passes = passes
        self._clock = clock
        self._fairness = fairness
        cap = fairness.cap
        # At most how many more each portal may take: its cap less its events in handlers, then
        # what a read found it has due.
        self._room = {} if cap is None else {p: cap - leased.get(p, 0) for p in self._portals}
        self._found: dict[str, list[Any]] = {}
        self.turns = Turns({}, {}, clock)

    def wanted(self) -> dict[str, int]:
        """The portals to read now, and how many rows of each (empty: the plan is complete)."""
        self.turns = share(
            self._count, self._portals, self._passes, self._clock, self._fairness, self._room
        )
        return {p: n for p, n in self.turns.taken.items() if len(self._found.get(p, ())) < n}

    def found(self, portal: str, ids: list[Any], asked: int) -> None:
        """`portal` gave `ids` when asked for `asked`: fewer means that is all it has due."""
        self._found[portal] = ids
        if len(ids) < asked:
            self._room[portal] = min(self._room.get(portal, asked), len(ids))

    def ids(self) -> list[Any]:
        return [i for p, n in self.turns.taken.items() for i in self._found.get(p, [])[:n]]


class Waiting:
    """Deliveries a worker process holds but has not started, taken by the same rule, portal by
    portal (RabbitMQ, docs/fairness.md: the shard queues' deliveries and the consumer queue's
    meet here). The passes and the clock are this process's own: the broker's shards keep
    portals apart between processes, this keeps them apart within one."""

    def __init__(self, fairness: Fairness) -> None:
        self._fairness = fairness
        self._items: dict[str, deque[Any]] = {}
        self._passes: dict[str, float] = {}
        self._clock = 0.0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def put(self, portal: str, item: Any) -> None:
        items = self._items.get(portal)
        if items is None:
            items = self._items[portal] = deque()
        items.append(item)
        self._count += 1

    def take(self) -> Any:
        """The next item by the portals' starts (raises IndexError when none waits)."""
        turns = share(1, self._items, self._passes, self._clock, self._fairness, {})
        [portal] = turns.taken
        self._clock = turns.clock
        self._passes.update(turns.passes)
        items = self._items[portal]
        item = items.popleft()
        self._count -= 1
        if not items:
            del self._items[portal]
            # A pass at or behind the clock says nothing a missing one would not: forgotten,
            # so the passes kept stay as many as the portals seen lately.
            for p in [p for p, v in self._passes.items() if v <= self._clock]:
                del self._passes[p]
        return item

    def drain(self) -> list[Any]:
        """Everything waiting, in no particular order; none waits after."""
        out = [item for items in self._items.values() for item in items]
        self._items.clear()
        self._count = 0
        return out
