"""What exists on RabbitMQ, as data: exchanges, queue arguments and policies. No I/O here; the
AMQP side declares it (`topology`), the management API applies policies, `definitions` exports it.

  b24.events           topic exchange, routing key = event name; alternate exchange b24.unrouted
  b24.unrouted         fanout exchange + queue: events no consumer is bound to are kept here
  <queue>              a consumer's queue, bound to b24.events for its events
  <queue>.retry.<d>    one per retry delay: queue-wide TTL, then dead-lettered back to <queue> only
  <queue>.dlq          what failed for good; `b24queue dlq` inspects and replays it

A fair queue (`fair_share`, docs/fairness.md) takes its events through a shard of its own instead:

  <queue>.fair         consistent-hash exchange (plugin rabbitmq_consistent_hash_exchange),
                       bound to b24.events for the consumer's events; hashes x-b24-member-id
  <queue>.s0 .. .s15   its shard queues, each bound to it with weight 1: one portal, one shard
  <queue>              no longer bound: retries and replays come back to it, and the worker
                       consumes it beside the shards

Arguments are only what must never differ (queue type; a retry queue's TTL and where it hands
messages back: without those a retry would expire into nothing). What an operator may tune without
a deploy — delivery limit, dead-letter routing of the consumer queue, lengths — is a policy,
`b24queue.<queue>`, created when missing and never overwritten; so is the unrouted queue's cap
(`b24queue.b24.unrouted`), which an existing queue takes as it is (its arguments cannot change).
The shards have a policy of their own, `b24queue.<queue>.shards`, with the consumer queue's rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from b24queue import _constants as c
from b24queue.queues import DeclaredExchange, QueueSpec
from b24queue.settings import Settings

POLICY_PRIORITY = 10
# A fair queue's shards. Portals that hash to one shard share its turns at the broker; more
# shards part more portals, at one more queue each (docs/fairness.md). Never fewer than a fair
# queue was made with: a shard no longer fed must still be drained (`shards` lists them all).
SHARDS = 16
FAIR_EXCHANGE_TYPE = "x-consistent-hash"
# The weight of each shard's binding (its routing key): all alike.
SHARD_WEIGHT = "1"


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


def exchanges(settings: Settings) -> list[DeclaredExchange]:
    """The events exchange, then its alternate (and the queue that one feeds)."""
    return [
        DeclaredExchange(settings.exchange, "topic", alternate=settings.unrouted),
        DeclaredExchange(settings.unrouted, "fanout", queue=settings.unrouted),
    ]


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


def fair_exchange(spec: QueueSpec) -> str:
    return spec.name + c.FAIR_SUFFIX


def fair_exchange_arguments() -> dict[str, Any]:
    return {"hash-header": c.H_MEMBER_ID}


def shards(spec: QueueSpec) -> list[str]:
    """A fair queue's shard queues, in the order they are bound (the hash's buckets)."""
    return [f"{spec.name}{c.SHARD_SUFFIX}{i}" for i in range(SHARDS)]


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


def shard_policy(settings: Settings, spec: QueueSpec) -> Policy:
    """The consumer queue's rules (dead-lettering to its DLQ, delivery limit) for its shards."""
    policy = consumer_policy(settings, spec)
    return Policy(
        name=f"{policy.name}.shards",
        pattern=f"^{re.escape(spec.name + c.SHARD_SUFFIX)}[0-9]+$",
        definition=policy.definition,
    )


def queue_policies(settings: Settings, spec: QueueSpec) -> list[Policy]:
    """A consumer queue's policy, and its shards' when it is fair."""
    return [consumer_policy(settings, spec)] + (
        [shard_policy(settings, spec)] if spec.fairness.on else []
    )


def unrouted_policy(settings: Settings) -> Policy:
    """The unrouted queue's cap: past either length RabbitMQ drops the oldest (`drop-head`):
    a refused publish would be a 503 Bitrix24 does not resend, and nobody consumes these yet
    (`b24queue.transports.kit.unrouted`)."""
    return Policy(
        name=f"b24queue.{settings.unrouted}",
        pattern=f"^{re.escape(settings.unrouted)}$",
        definition={
            "max-length": settings.unrouted_max_events,
            "max-length-bytes": settings.unrouted_max_bytes,
            "overflow": "drop-head",
        },
    )


def queue_plan(settings: Settings, spec: QueueSpec) -> list[tuple[str, dict[str, Any]]]:
    """Every queue of a consumer with the arguments we declare it with."""
    plan = [(spec.name, queue_arguments(settings))]
    plan += [
        (spec.retry_queue(d), retry_queue_arguments(settings, spec.name, d))
        for d in sorted(set(spec.retry_delays_s))
    ]
    plan.append((spec.dlq, queue_arguments(settings)))
    if spec.fairness.on:
        plan += [(name, queue_arguments(settings)) for name in shards(spec)]
    return plan
