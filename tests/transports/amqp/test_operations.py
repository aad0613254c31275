"""Operations without a broker: status from management data, definitions, policies, views."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from b24queue.cli.status import render
from b24queue.errors import ManagementError
from b24queue.queues import spec_for
from b24queue.settings import load_settings
from b24queue.transports.amqp.definitions import definitions
from b24queue.transports.amqp.layout import consumer_policy
from b24queue.transports.amqp.management import ManagementClient
from b24queue.transports.amqp.status import summarize
from examples.deals import DealSync
from examples.logger import EventLogger
from tests.support.processes import ROOT


def q(
    name: str, ready: int = 0, unacked: int = 0, consumers: int = 0, **rates: float
) -> dict[str, Any]:
    stats = {f"{k}_details": {"rate": v} for k, v in rates.items()}
    return {
        "name": name,
        "type": "quorum",
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
        "consumers": consumers,
        "message_stats": stats,
    }


def test_status_groups_each_consumer_queue_with_its_retries_and_dlq() -> None:
    settings = load_settings()
    queues = [
        q("deal-sync", 5, 2, 1, publish=3.5, deliver_get=3.0, ack=2.5),
        q("deal-sync.retry.1s", 1),
        q("deal-sync.retry.5s", 2, 1),
        q("deal-sync.dlq", 4),
        q("other-app", 9),
        q("other-app.dlq", 1),  # not bound to our exchange: not ours
        q("b24.unrouted", 3),
    ]
    conns = [
        {
            "client_properties": {"connection_name": "b24queue ingress h:1"},
            "state": "running",
            "channels": 1,
            "vhost": "/",
        },
        {
            "client_properties": {"connection_name": "someone else"},
            "state": "running",
            "channels": 1,
            "vhost": "/",
        },
    ]
    status = summarize(settings, queues, conns, bound={"deal-sync"})
    [row] = status.queues
    assert (row.queue, row.ready, row.unacked, row.consumers) == ("deal-sync", 5, 2, 1)
    assert (row.publish_per_s, row.deliver_per_s, row.ack_per_s) == (3.5, 3.0, 2.5)
    assert (row.retrying, row.dead_letters) == (4, 4)
    assert status.unrouted == 3
    assert [c.name for c in status.connections] == ["b24queue ingress h:1"]
    assert status.problems == ["deal-sync.dlq holds 4", "b24.unrouted holds 3"]
    text = render(status, settings)
    assert "deal-sync" in text and "DEAD LETTERS" in text
    assert json.loads(json.dumps(status.as_json()))["queues"][0]["dead_letters"] == 4
    # At its cap, the unrouted queue is said to be dropping its oldest.
    capped = summarize(load_settings(unrouted_max_events=3), queues, conns, bound={"deal-sync"})
    assert capped.problems[-1] == (
        "b24.unrouted holds 3, its cap (B24QUEUE_UNROUTED_MAX_EVENTS): its oldest are dropped "
        "as new ones come"
    )


def test_definitions_file_matches_the_examples() -> None:
    """rabbitmq/definitions.json is what `b24queue topology --definitions` prints for the
    examples; regenerate it with `make definitions` when the topology changes."""
    expected = definitions(load_settings(), [DealSync, EventLogger])
    assert json.loads((ROOT / "rabbitmq" / "definitions.json").read_text()) == expected


def test_definitions_hold_exchanges_queues_bindings_policies() -> None:
    d = definitions(load_settings(), [DealSync])  # fair (the default): its shards behind it
    names = {x["name"] for x in d["queues"]}
    assert names == {
        "b24.unrouted",
        "example.deal-sync",
        "example.deal-sync.retry.1s",
        "example.deal-sync.retry.5s",
        "example.deal-sync.retry.30s",
        "example.deal-sync.dlq",
        *(f"example.deal-sync.s{i}" for i in range(16)),
    }
    events = next(x for x in d["exchanges"] if x["name"] == "b24.events")
    assert events["arguments"] == {"alternate-exchange": "b24.unrouted"}
    fair = next(x for x in d["exchanges"] if x["name"] == "example.deal-sync.fair")
    assert (fair["type"], fair["arguments"]) == (
        "x-consistent-hash",
        {"hash-header": "x-b24-member-id"},
    )
    keys = [(b["source"], b["destination"], b["routing_key"]) for b in d["bindings"]]
    assert ("b24.events", "example.deal-sync.fair", "ONCRMDEALADD") in keys
    assert not [k for k in keys if k[1] == "example.deal-sync"]  # the queue itself: not bound
    shards = [k for k in keys if k[0] == "example.deal-sync.fair"]
    assert shards == [("example.deal-sync.fair", f"example.deal-sync.s{i}", "1") for i in range(16)]
    assert ("b24.unrouted", "b24.unrouted", "") in keys
    cap, policy, shard_policy = d["policies"]
    assert policy["definition"]["delivery-limit"] == DealSync.max_deliveries
    assert shard_policy["pattern"] == r"^example\.deal\-sync\.s[0-9]+$"
    assert shard_policy["definition"] == policy["definition"]
    plain = definitions(load_settings(), [type("Plain", (DealSync,), {"fair_share": False})])
    keys = [(b["source"], b["destination"], b["routing_key"]) for b in plain["bindings"]]
    assert ("b24.events", "example.deal-sync", "ONCRMDEALADD") in keys
    assert len(plain["queues"]) == 6 and len(plain["policies"]) == 2
    # The unrouted queue's cap: the oldest dropped past either length (a policy: an existing
    # queue takes it as it is).
    assert (cap["name"], cap["pattern"]) == ("b24queue.b24.unrouted", r"^b24\.unrouted$")
    assert cap["definition"] == {
        "max-length": 100_000,
        "max-length-bytes": 256 * 1024 * 1024,
        "overflow": "drop-head",
    }


def test_policy_of_a_quorum_and_a_classic_queue() -> None:
    quorum = consumer_policy(load_settings(), spec_for(DealSync))
    assert quorum.name == "b24queue.example.deal-sync"
    assert quorum.pattern == r"^example\.deal\-sync$"
    assert quorum.definition == {
        "dead-letter-exchange": "",
        "dead-letter-routing-key": "example.deal-sync.dlq",
        "dead-letter-strategy": "at-least-once",
        "overflow": "reject-publish",
        "delivery-limit": 20,
    }
    classic = consumer_policy(load_settings(queue_type="classic"), spec_for(DealSync))
    assert "delivery-limit" not in classic.definition


async def test_management_unreachable_is_a_clear_error() -> None:
    client = ManagementClient(load_settings(management_url="http://127.0.0.1:1"), timeout_s=2)
    with pytest.raises(ManagementError, match="cannot reach the RabbitMQ management API"):
        await asyncio.to_thread(client.queues)


def test_management_client_logs_in_with_the_decoded_password() -> None:
    """`amqp://user:p%40ss@…` logs in to AMQP as p@ss (yarl decodes): so must the API client."""
    client = ManagementClient(load_settings(amqp_url="amqp://user:p%40ss@host/"))
    token = client._headers["Authorization"].removeprefix("Basic ")
    assert base64.b64decode(token) == b"user:p@ss"
