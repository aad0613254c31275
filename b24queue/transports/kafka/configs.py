"""The topic settings b24queue needs, and their check on topics that exist already.

A stock Kafka deletes records after 7 days (`retention.ms` 604800000, `cleanup.policy=delete`).
That is wrong for the topics that hold state rather than traffic:

- `<exchange>.bindings`: compacted (records keyed by queue): after a quiet week an ingress
  restarted would read no bindings and send every event to the unrouted topic;
- `<queue>.deliveries`: compacted (records keyed by topic/partition/offset, or per partition for
  the settled marks), so the counts and marks of open records stay;
- the unrouted topic and `<queue>.dlq`: kept for ever (`retention.ms=-1`): expiry would delete
  events nobody handled.

The events and retry topics keep the broker's retention: it bounds how long a queue's workers may
be away (records and committed offsets expire).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from b24queue.errors import TopologyMismatchError

log = logging.getLogger(__name__)

COMPACT: Mapping[str, str] = {"cleanup.policy": "compact"}
KEEP: Mapping[str, str] = {"retention.ms": "-1"}
# What a setting is when the broker describes a topic without it (Tansu lists only those set).
KAFKA_DEFAULTS: Mapping[str, str] = {"cleanup.policy": "delete", "retention.ms": "604800000"}


async def check_configs(
    admin: AIOKafkaAdminClient, wanted: Mapping[str, Mapping[str, str]]
) -> None:
    """Each topic of `wanted` must have those settings; a difference is a topology mismatch
    (never changed silently). A broker that cannot describe configs: skipped, said in the log."""
    names = [n for n, configs in wanted.items() if configs]
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
