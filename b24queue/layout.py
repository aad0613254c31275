"""What exists on the broker, as data: names, queue arguments and policies. No I/O here; the AMQP
side declares it (`amqp.topology`), the management API applies policies, `definitions` exports it.

  b24.events           topic exchange, routing key = event name; alternate exchange b24.unrouted
  b24.unrouted         fanout exchange + queue: events no consumer is bound to are kept here
  <queue>              a consumer's queue, bound to b24.events for its events
  <queue>.retry.<d>    one per retry delay: queue-wide TTL, then dead-lettered back to <queue> only
  <queue>.dlq          what failed for good; `b24queue dlq` inspects and replays it

Arguments are only what must never differ (queue type; a retry queue's TTL and where it hands
messages back: without those a retry would expire into nothing). What an operator may tune without
a deploy — delivery limit, dead-letter routing of the consumer queue, lengths — is a policy,
`b24queue.<queue>`, created when missing and never overwritten; so is the unrouted queue's cap
(`b24queue.b24.unrouted`), which an existing queue takes as it is (its arguments cannot change).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from b24queue import _constants as c
from b24queue.consumer import EventConsumer
from b24queue.settings import Settings

POLICY_PRIORITY = 10


def retry_queue_name(queue: str, delay_s: float) -> str:
    if float(delay_s).is_integer():
        return f"{queue}{c.RETRY_SUFFIX}{int(delay_s)}s"
    return f"{queue}{c.RETRY_SUFFIX}{round(delay_s * 1000)}ms"


def dlq_name(queue: str) -> str:
    return queue + c.DLQ_SUFFIX


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """What a consumer needs on the broker. `bindings` are routing keys or topic patterns."""

    name: str
    bindings: tuple[str, ...]
    retry_delays_s: tuple[float, ...]
    max_deliveries: int | None = None

    @property
    def dlq(self) -> str:
        return dlq_name(self.name)

    def retry_queue(self, delay_s: float) -> str:
        return retry_queue_name(self.name, delay_s)


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    pattern: str
    definition: dict[str, Any]
    apply_to: str = "queues"
    priority: int = POLICY_PRIORITY

    def as_api_body(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "definition": self.definition,
            "apply-to": self.apply_to,
            "priority": self.priority,
        }


def spec_for(consumer: type[EventConsumer]) -> QueueSpec:
    return QueueSpec(
        name=consumer.queue,
        bindings=consumer.binding_keys(),
        retry_delays_s=tuple(float(d) for d in consumer.retry_delays_s),
        max_deliveries=consumer.max_deliveries,
    )


def queue_arguments(settings: Settings) -> dict[str, Any]:
    args: dict[str, Any] = {"x-queue-type": settings.queue_type}
    if settings.queue_type == "quorum" and settings.quorum_group_size is not None:
        args["x-quorum-initial-group-size"] = settings.quorum_group_size
    return args


def retry_queue_arguments(settings: Settings, target: str, delay_s: float) -> dict[str, Any]:
    args: dict[str, Any] = {
        **queue_arguments(settings),
        "x-message-ttl": round(delay_s * 1000),
        # The default exchange with the queue's own name delivers to that queue only: a retry
        # must not reach other consumers bound to the same event.
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": target,
    }
    if settings.queue_type == "quorum":
        # Classic dead-lettering is at-most-once; quorum queues can do at-least-once, which
        # needs reject-publish overflow. A retry must not vanish on its way back.
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    return args


def consumer_policy(settings: Settings, spec: QueueSpec) -> Policy:
    """Dead-letter routing and the delivery limit of a consumer's queue.

    The delivery limit (quorum queues) is what stops a message that kills the worker process
    (not an exception: a crash) from being redelivered forever: after `max_deliveries` deliveries
    the broker dead-letters it to `<queue>.dlq`.
    """
    definition: dict[str, Any] = {
        "dead-letter-exchange": "",
        "dead-letter-routing-key": spec.dlq,
    }
    if settings.queue_type == "quorum":
        definition["dead-letter-strategy"] = "at-least-once"
        definition["overflow"] = "reject-publish"
        if spec.max_deliveries is not None:
            definition["delivery-limit"] = spec.max_deliveries
    return Policy(
        name=f"b24queue.{spec.name}",
        pattern=f"^{re.escape(spec.name)}$",
        definition=definition,
    )


def unrouted_policy(settings: Settings) -> Policy:
    """The unrouted queue's cap: past either length RabbitMQ drops the oldest (`drop-head`):
    a refused publish would be a 503 Bitrix24 does not resend, and nobody consumes these yet
    (`b24queue.transports.unrouted`)."""
    return Policy(
        name=f"b24queue.{settings.unrouted}",
        pattern=f"^{re.escape(settings.unrouted)}$",
        definition={
            "max-length": settings.unrouted_max_events,
            "max-length-bytes": settings.unrouted_max_bytes,
            "overflow": "drop-head",
        },
    )


@dataclass(frozen=True, slots=True)
class QueueState:
    """A queue as it exists: what `b24queue topology` prints."""

    name: str
    messages: int
    consumers: int
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BindingChange:
    """How a consumer queue's bindings differ from what its class declares. `current` None:
    the queue does not exist yet."""

    queue: str
    current: frozenset[str] | None
    wanted: tuple[str, ...]

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


def queue_plan(settings: Settings, spec: QueueSpec) -> list[tuple[str, dict[str, Any]]]:
    """Every queue of a consumer with the arguments we declare it with."""
    plan = [(spec.name, queue_arguments(settings))]
    plan += [
        (spec.retry_queue(d), retry_queue_arguments(settings, spec.name, d))
        for d in sorted(set(spec.retry_delays_s))
    ]
    plan.append((spec.dlq, queue_arguments(settings)))
    return plan
