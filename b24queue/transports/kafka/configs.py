"""The topic settings b24queue needs, and their check on topics that exist already.

A stock Kafka deletes records after 7 days (`retention.ms` 604800000, `cleanup.policy=delete`).
That is wrong for the topics that hold state rather than traffic:

- `<exchange>.bindings`: compacted (records keyed by queue): after a quiet week an ingress
  restarted would read no bindings and send every event to the unrouted topic;
- `<queue>.deliveries`: compacted (records keyed by topic/partition/offset, or per partition for
  the settled marks), so the counts and marks of open records stay;
- the unrouted topic and `<queue>.dlq`: kept for ever (`retention.ms=-1`): expiry would delete
  events nobody handled. The unrouted topic is capped in size instead (`retention.bytes`, with
  segments small enough for it to bite: Kafka drops whole segments, the oldest first); an
  existing topic keeps the cap it has (an operator's), and one without any is said in the log.

The events and retry topics keep the broker's retention: it bounds how long a queue's workers may
be away (records and committed offsets expire).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from b24queue.errors import TopologyMismatchError
from b24queue.settings import Settings

log = logging.getLogger(__name__)

COMPACT: Mapping[str, str] = {"cleanup.policy": "compact"}
KEEP: Mapping[str, str] = {"retention.ms": "-1"}
# What a setting is when the broker describes a topic without it (Tansu lists only those set).
KAFKA_DEFAULTS: Mapping[str, str] = {
    "cleanup.policy": "delete",
    "retention.ms": "604800000",
    "retention.bytes": "-1",
    "segment.bytes": "1073741824",
}
MIN_SEGMENT_BYTES = 1024 * 1024  # Kafka 4 refuses smaller segments


def capped(settings: Settings) -> Mapping[str, str]:
    """The unrouted topic's cap (`B24QUEUE_UNROUTED_MAX_BYTES`): Kafka deletes its oldest
    segment while the rest still holds the cap, so it holds up to the cap plus one segment."""
    cap = settings.unrouted_max_bytes
    segment = min(max(cap // 8, MIN_SEGMENT_BYTES), int(KAFKA_DEFAULTS["segment.bytes"]))
    return {"retention.bytes": str(cap), "segment.bytes": str(segment)}


async def check_configs(
    admin: AIOKafkaAdminClient,
    wanted: Mapping[str, Mapping[str, str]],
    initial: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Each topic of `wanted` must have those settings; a difference is a topology mismatch
    (never changed silently). Those of `initial` are what a topic is created with: one that has
    the broker's default instead is said in the log, any other value is the operator's. A broker
    that cannot describe configs: skipped, said in the log."""
    initial = initial or {}
    names = [n for n in wanted if wanted[n] or initial.get(n)]
    if not names:
        return
    resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
    try:
        responses = await admin.describe_configs(resources)
    except Exception as exc:
        log.warning("Kafka cannot describe topic configs (%r): their retention is not checked", exc)
        return
    for response in responses:
        for resource in response.resources:
            code, _, _, name, entries = resource[:5]
            if code != 0:
                log.warning("Kafka cannot describe topic %r (error %d): not checked", name, code)
                continue
            have = {entry[0]: entry[1] for entry in entries}
            for key, value in wanted[name].items():
                actual = have.get(key, KAFKA_DEFAULTS.get(key))
                if actual != value:
                    raise TopologyMismatchError(
                        f"topic {name!r} has {key}={actual}, b24queue needs {key}={value}: "
                        f"run `kafka-configs --alter --entity-type topics --entity-name {name} "
                        f"--add-config {key}={value}`"
                    )
            unset = {
                k: v
                for k, v in initial.get(name, {}).items()
                if have.get(k, KAFKA_DEFAULTS.get(k)) == KAFKA_DEFAULTS.get(k)
            }
            if unset:
                add = ",".join(f"{k}={v}" for k, v in unset.items())
                log.warning(
                    "topic %r has no cap (it was made by an older b24queue): run `kafka-configs "
                    "--alter --entity-type topics --entity-name %s --add-config %s`",
                    name,
                    name,
                    add,
                )
