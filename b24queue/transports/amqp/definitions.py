"""The broker definitions (`rabbitmq/definitions.json`) for a set of consumers: what
`b24queue topology` declares, in the form `load_definitions` loads at broker boot."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any

from b24queue.consumer import EventConsumer
from b24queue.queues import spec_for
from b24queue.settings import Settings
from b24queue.transports.amqp.layout import (
    FAIR_EXCHANGE_TYPE,
    SHARD_WEIGHT,
    fair_exchange,
    fair_exchange_arguments,
    queue_arguments,
    queue_plan,
    queue_policies,
    shards,
    unrouted_policy,
)

# A node that boots from definitions gets no default user or vhost unless the file has them.
# guest/guest (loopback only, RabbitMQ's default rule) keeps a local node usable; change it.
_GUEST_SALT = b"b24q"


def _password_hash(password: str, salt: bytes = _GUEST_SALT) -> str:
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def definitions(settings: Settings, classes: Sequence[type[EventConsumer]]) -> dict[str, Any]:
    vhost = settings.vhost
    queues = [(settings.unrouted, queue_arguments(settings))]
    bindings = [_binding(vhost, settings.unrouted, settings.unrouted, "")]
    cap = unrouted_policy(settings)
    policies = [{"vhost": vhost, "name": cap.name, **cap.as_api_body()}]
    exchanges = [
        _exchange(vhost, settings.unrouted, "fanout", {}),
        _exchange(vhost, settings.exchange, "topic", {"alternate-exchange": settings.unrouted}),
    ]
    for cls in classes:
        spec = spec_for(cls)
        queues += queue_plan(settings, spec)
        if spec.fairness.on:
            # A fair queue's events reach its shards through its consistent-hash exchange; the
            # shards bound in order (each binding's place is its bucket of the hash).
            fair = fair_exchange(spec)
            exchanges.append(_exchange(vhost, fair, FAIR_EXCHANGE_TYPE, fair_exchange_arguments()))
            bindings += [
                _binding(vhost, settings.exchange, fair, k, "exchange") for k in spec.bindings
            ]
            bindings += [_binding(vhost, fair, shard, SHARD_WEIGHT) for shard in shards(spec)]
        else:
            bindings += [_binding(vhost, settings.exchange, spec.name, k) for k in spec.bindings]
        for policy in queue_policies(settings, spec):
            policies.append({"vhost": vhost, "name": policy.name, **policy.as_api_body()})
    return {
        "users": [
            {
                "name": "guest",
                "password_hash": _password_hash("guest"),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"],
                "limits": {},
            }
        ],
        "vhosts": [{"name": vhost}],
        "permissions": [
            {"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
        ],
        "exchanges": exchanges,
        "queues": [
            {"name": name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": args}
            for name, args in queues
        ],
        "bindings": bindings,
        "policies": policies,
    }


def _exchange(vhost: str, name: str, kind: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": arguments,
    }


def _binding(
    vhost: str, source: str, destination: str, key: str, kind: str = "queue"
) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": vhost,
        "destination": destination,
        "destination_type": kind,
        "routing_key": key,
        "arguments": {},
    }
