"""`b24queue status` on RabbitMQ: the management API's queues and connections as a `Status`."""

from __future__ import annotations

from typing import Any

from b24queue import _constants as c
from b24queue.settings import Settings
from b24queue.transports.status import ConnectionRow, QueueRow, Status, problems


def _rate(queue: dict[str, Any], key: str) -> float:
    stats = queue.get("message_stats") or {}
    return round(float((stats.get(f"{key}_details") or {}).get("rate", 0.0)), 2)


def _depth(queue: dict[str, Any] | None) -> int:
    if queue is None:
        return 0
    return int(queue.get("messages_ready", 0) or 0) + int(
        queue.get("messages_unacknowledged", 0) or 0
    )


def _shards(by_name: dict[str, dict[str, Any]], name: str) -> list[dict[str, Any]]:
    prefix = name + c.SHARD_SUFFIX
    return [q for k, q in by_name.items() if k.startswith(prefix) and k[len(prefix) :].isdigit()]


def summarize(
    settings: Settings,
    queues: list[dict[str, Any]],
    connections: list[dict[str, Any]],
    bound: set[str],
) -> Status:
    """Consumer queues are the queues bound to our exchange (`bound`), or whose fair exchange is,
    that have a `.dlq` sibling: found on the broker, no consumer code needed. A fair queue's
    shards count in its row (what waits, the rates); its consumers are the queue's own."""
    by_name = {q["name"]: q for q in queues}
    rows = []
    for name in sorted(by_name):
        if name + c.DLQ_SUFFIX not in by_name:
            continue
        if name not in bound and name + c.FAIR_SUFFIX not in bound:
            continue
        q = by_name[name]
        parts = [q, *_shards(by_name, name)]
        retry_prefix = name + c.RETRY_SUFFIX
        rows.append(
            QueueRow(
                queue=name,
                type=str(q.get("type", "")),
                ready=sum(int(p.get("messages_ready", 0) or 0) for p in parts),
                unacked=sum(int(p.get("messages_unacknowledged", 0) or 0) for p in parts),
                consumers=int(q.get("consumers", 0) or 0),
                publish_per_s=round(sum(_rate(p, "publish") for p in parts), 2),
                deliver_per_s=round(sum(_rate(p, "deliver_get") for p in parts), 2),
                ack_per_s=round(sum(_rate(p, "ack") for p in parts), 2),
                retrying=sum(_depth(v) for k, v in by_name.items() if k.startswith(retry_prefix)),
                dead_letters=_depth(by_name[name + c.DLQ_SUFFIX]),
            )
        )
    ours = [
        ConnectionRow(
            name=str((conn.get("client_properties") or {}).get("connection_name", "")),
            state=str(conn.get("state", "")),
            channels=int(conn.get("channels", 0) or 0),
        )
        for conn in connections
        if conn.get("vhost", settings.vhost) == settings.vhost
        and str((conn.get("client_properties") or {}).get("connection_name", "")).startswith(
            c.CONNECTION_PREFIX
        )
    ]
    unrouted = _depth(by_name.get(settings.unrouted))
    connected = sorted(ours, key=lambda r: r.name)
    return Status(rows, unrouted, connected, problems(settings, rows, unrouted))
