"""Queue names and what a consumer needs of a queue, whichever transport keeps it. No I/O here.

  <queue>              a consumer's queue, bound to the events its class names
  <queue>.retry.<d>    where a failed event waits `d` before it is delivered again to <queue>
  <queue>.dlq          what failed for good; `b24queue dlq` inspects and replays it
  the unrouted queue   events no consumer is bound to (`B24QUEUE_UNROUTED`)

Bindings are routing keys or topic patterns (`*` one word, `#` any number of words): a transport
that routes by itself matches them with `topic_matches` (or `topic_regex`, in SQL).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from b24queue import _constants as c
from b24queue.consumer import EventConsumer
from b24queue.ordering import STRICT, Ordering, path_reader


def retry_queue_name(queue: str, delay_s: float) -> str:
    if float(delay_s).is_integer():
        return f"{queue}{c.RETRY_SUFFIX}{int(delay_s)}s"
    return f"{queue}{c.RETRY_SUFFIX}{round(delay_s * 1000)}ms"


def dlq_name(queue: str) -> str:
    return queue + c.DLQ_SUFFIX


# What a queue keeps of a portal's member_id to group its events by (Bitrix24's are 32
# characters); longer ones are cut, and portals alike up to here share one group.
MAX_PORTAL_CHARS = 64


def portal_key(member_id: object) -> str:
    """The group an event's portal (`auth.member_id`, or its header) falls in: "" for none."""
    return str(member_id)[:MAX_PORTAL_CHARS] if member_id else ""


@dataclass(frozen=True, slots=True)
class Fairness:
    """How a consumer's handler slots are shared among portals (`EventConsumer.fair_share`,
    `max_in_flight_per_portal`, `portal_weights`; docs/fairness.md). `on` False: first in, first
    out across portals, as the queue holds them."""

    on: bool = False
    cap: int | None = None  # events of one portal in handlers at once, across workers
    weights: Mapping[str, int] = field(default_factory=dict)  # portal_key -> weight

    def weight(self, portal: str) -> int:
        return self.weights.get(portal, 1)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """What a consumer needs of the transport. `bindings` are routing keys or topic patterns."""

    name: str
    bindings: tuple[str, ...]
    retry_delays_s: tuple[float, ...]
    max_deliveries: int | None = None
    fairness: Fairness = field(default_factory=Fairness, compare=False)
    ordering: Ordering = field(default_factory=Ordering, compare=False)

    @property
    def dlq(self) -> str:
        return dlq_name(self.name)

    def retry_queue(self, delay_s: float) -> str:
        return retry_queue_name(self.name, delay_s)


def spec_for(consumer: type[EventConsumer]) -> QueueSpec:
    return QueueSpec(
        name=consumer.queue,
        bindings=consumer.binding_keys(),
        retry_delays_s=tuple(float(d) for d in consumer.retry_delays_s),
        max_deliveries=consumer.max_deliveries,
        fairness=Fairness(
            on=consumer.fair_share,
            cap=consumer.max_in_flight_per_portal,
            weights={portal_key(k): int(w) for k, w in consumer.portal_weights.items()},
        ),
        ordering=ordering_of(consumer),
    )


def ordering_of(consumer: type[EventConsumer]) -> Ordering:
    key = consumer.ordering_key
    if key is None:
        return Ordering()
    read = path_reader(key) if isinstance(key, str) else key
    return Ordering(read, consumer.ordering == STRICT, consumer.__name__, consumer.coalesce)


@dataclass(frozen=True, slots=True)
class DeclaredQueue:
    """A queue as it exists once declared: what `b24queue topology` prints. `arguments`: what
    the transport says of it (RabbitMQ: the queue's arguments; elsewhere where it lives)."""

    name: str
    messages: int
    consumers: int
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeclaredExchange:
    """An exchange a transport routes events through (`DeclaresExchanges`), as `b24queue
    topology` prints it: its kind, where an event no binding matches goes, the one queue it feeds
    (if that is all it does)."""

    name: str
    kind: str  # topic, fanout
    alternate: str | None = None
    queue: str | None = None


@dataclass(frozen=True, slots=True)
class BindingChange:
    """How a consumer queue's bindings differ from what its class declares. `current` None:
    the queue does not exist yet. `kind`: what is bound, a queue or (RabbitMQ's fair queues) the
    exchange in front of its shards, named in `queue`."""

    queue: str
    current: frozenset[str] | None
    wanted: tuple[str, ...]
    kind: str = "queue"

    @property
    def to_add(self) -> tuple[str, ...]:
        return tuple(k for k in self.wanted if self.current is None or k not in self.current)

    @property
    def to_remove(self) -> tuple[str, ...]:
        return tuple(sorted((self.current or frozenset()) - set(self.wanted)))


def topic_matches(pattern: str, key: str) -> bool:
    """A topic exchange's rule, for transports that route themselves: words split on `.`; `*`
    is exactly one word, `#` zero or more words. (`CATALOG.#` matches `CATALOG` too.)"""
    words, parts = key.split("."), pattern.split(".")
    # reachable[j]: the first i pattern parts can match the first j words
    reachable = [True] + [False] * len(words)
    for part in parts:
        nxt = [False] * (len(words) + 1)
        for j, ok in enumerate(reachable):
            if not ok:
                continue
            if part == "#":
                for k in range(j, len(words) + 1):
                    nxt[k] = True
                break  # every later j is covered by this one
            if j < len(words) and (part == "*" or part == words[j]):
                nxt[j + 1] = True
        reachable = nxt
    return reachable[len(words)]


def topic_regex(pattern: str) -> str:
    """`topic_matches` as a regular expression over `"." + key` (for a database that routes in
    SQL): `*` is one `.word`, `#` any number of them."""
    parts = []
    for part in pattern.split("."):
        if part == "#":
            parts.append(r"(\.[^.]+)*")
        elif part == "*":
            parts.append(r"\.[^.]+")
        else:
            parts.append(r"\." + re.escape(part))
    return "^" + "".join(parts) + "$"
