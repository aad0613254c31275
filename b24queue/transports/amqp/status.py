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


def summarize(
    settings: Settings,
    queues: list[dict[str, Any]],
    connections: list[dict[str, Any]],
    bound: set[str],
) -> Status:
    """Consumer queues are the queues bound to our exchange (`bound`) that have a `.dlq`
    sibling: found on the broker, no consumer code needed."""
    by_name = {q["name"]: q for q in queues}
    rows = []
    for name in sorted(by_name):
        if name not in bound or name + c.DLQ_SUFFIX not in by_name:
            continue
        q = by_name[name]
        retry_prefix = name + c.RETRY_SUFFIX
        rows.append(
            QueueRow(
                queue=name,
                type=str(q.get("type", "")),
                ready=int(q.get("messages_ready", 0) or 0),
                unacked=int(q.get("messages_unacknowledged", 0) or 0),
                consumers=int(q.get("consumers", 0) or 0),
                publish_per_s=_rate(q, "publish"),
                deliver_per_s=_rate(q, "deliver_get"),
                ack_per_s=_rate(q, "ack"),
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
