"""Prometheus metrics of the ingress and the workers, each set on its own registry (so several
apps in one process, as in tests, never collide).

Several ingress processes (`prefork`) run prometheus_client's multiprocess mode: the parent sets
PROMETHEUS_MULTIPROC_DIR for its children, their values go to files there, and /metrics from any
child sums them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Confirms take ~1-20 ms normally and up to a few hundred under load (batched fsync).
_PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)
_HANDLE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0)
# An event waits a few ms in an idle queue, seconds to minutes behind a backlog.
_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


MAX_EVENT_LABELS = 200
OTHER = "other"


class EventLabels:
    """The `event` label of a metric: the first `MAX_EVENT_LABELS` distinct names this process
    saw, then `other`, so that no caller can create series without bound (names are bounded in
    length at the edge; a portal sends a few dozen)."""

    def __init__(self, limit: int = MAX_EVENT_LABELS) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def of(self, name: str) -> str:
        if name in self._seen:
            return name
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(name)
        return name


class IngressMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter(
            "b24queue_ingress_accepted",
            "Events stored (confirmed) and answered 200",
            ["event"],
            registry=self.registry,
        )
        self.refused = Counter(
            "b24queue_ingress_refused",
            "Requests refused with 4xx, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.not_stored = Counter(
            "b24queue_ingress_broker_unavailable",
            "Events answered 503: the broker was unreachable, blocked, slow or refused them",
            ["event"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "b24queue_ingress_publish_seconds",
            "Publish until broker confirm",
            buckets=_PUBLISH_BUCKETS,
            registry=self.registry,
        )

        self.spooled = Counter(
            "b24queue_ingress_spooled",
            "Events accepted into the local spool (broker unavailable)",
            registry=self.registry,
        )
        self.forwarded = Counter(
            "b24queue_ingress_forwarded",
            "Spooled events since moved into the queue",
            registry=self.registry,
        )
        self.spool_events = Gauge(
            "b24queue_ingress_spool_events",
            "Events in the spool now, not yet in the queue",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.spool_quarantined = Gauge(
            "b24queue_ingress_spool_quarantined",
            "Spooled events moved aside: the broker refused them, or they broke the connection "
            "(kept; `b24queue spool list` / `replay`)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

        self.unrouted_dropped = unrouted_dropped(self.registry)

        self._accepted: dict[str, Any] = {}

    def count_accepted(self, event: str) -> None:
        """One more accepted event. `event` is a bounded label (`EventLabels.of`): its counter
        is looked up once, not hashed and locked per request as `labels()` does."""
        counter = self._accepted.get(event)
        if counter is None:
            counter = self._accepted[event] = self.accepted.labels(event)
        counter.inc()

    def watch_spool(self, sink: SpoolStats) -> None:
        def changed(spooled: int, forwarded: int) -> None:
            self.spooled.inc(spooled)
            self.forwarded.inc(forwarded)
            self.spool_events.set(sink.depth)
            self.spool_quarantined.set(sink.quarantined)

        sink.on_change = changed
        changed(0, 0)  # a spool that still holds events from the last run

    def watch_unrouted(self, cap: DropStats) -> None:
        cap.on_dropped = self.unrouted_dropped.inc

    def render(self) -> bytes:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def forget_process(pid: int, directory: str) -> None:
    """A child ingress process is gone: drop its live gauges from the summed metrics."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def unrouted_dropped(registry: CollectorRegistry) -> Counter:
    """Events a publisher of this process dropped from the unrouted queue to keep it within its
    cap (no portal label: the cap is the queue's). RabbitMQ drops them itself: its Prometheus
    plugin counts them (`rabbitmq_global_messages_dead_lettered_maxlen_total`)."""
    return Counter(
        "b24queue_unrouted_dropped",
        "Oldest events dropped from the unrouted queue to keep it within "
        "B24QUEUE_UNROUTED_MAX_EVENTS / _MAX_BYTES",
        registry=registry,
    )


class DropStats(Protocol):
    on_dropped: Callable[[int], None] | None


class SpoolStats(Protocol):
    on_change: Callable[[int, int], None] | None

    @property
    def depth(self) -> int: ...

    @property
    def quarantined(self) -> int: ...


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.outcomes = Counter(
            "b24queue_worker_events",
            "Deliveries settled, by outcome (ack, retry, dead_letter)",
            ["queue", "event", "outcome"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "b24queue_worker_in_flight",
            "handle() calls running now",
            ["queue"],
            registry=self.registry,
        )
        self.handle_seconds = Histogram(
            "b24queue_worker_handle_seconds",
            "Time from delivery to settled",
            ["queue", "event"],
            buckets=_HANDLE_BUCKETS,
            registry=self.registry,
        )
        # No portal label (there may be thousands): how long a queue's events wait, whoever sent
        # them.
        self.wait_seconds = Histogram(
            "b24queue_worker_wait_seconds",
            "Time from the ingress's acceptance of an event to the start of its handling "
            "(first attempts only)",
            ["queue"],
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )

        # Calling portals back (b24queue.portal): no portal label (there may be thousands).
        self.portal_calls = Counter(
            "b24queue_portal_calls",
            "REST requests to portals, by answer (ok, QUERY_LIMIT_EXCEEDED, expired_token, ...)",
            ["answer"],
            registry=self.registry,
        )
        self.portal_wait_seconds = Histogram(
            "b24queue_portal_wait_seconds",
            "Time a request waited for its place in its portal's bucket",
            buckets=(0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0),
            registry=self.registry,
        )
        self.portal_refreshes = Counter(
            "b24queue_portal_refreshes", "OAuth token refreshes made", registry=self.registry
        )
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        # Whoever can publish to the exchange names events: bounded like the ingress's.
        self._events = EventLabels()

    def count_in_flight(self, queue: str, count: Callable[[], int]) -> None:
        """The queue's in-flight gauge reads `count()` when scraped: nothing to do per event."""
        self.in_flight.labels(queue).set_function(count)

    def observe(
        self,
        queue: str,
        event: str,
        outcome: str,
        duration_s: float,
        waited_s: float | None = None,
    ) -> None:
        """One settled delivery: its outcome, how long it took and, for a first attempt whose
        acceptance time is known, how long it waited for its handler."""
        # Label lookups hash and lock on every call; the children are cached per label set.
        event = self._events.of(event)
        key = (queue, event, outcome)
        children = self._children.get(key)
        if children is None:
            children = (
                self.outcomes.labels(queue, event, outcome),
                self.handle_seconds.labels(queue, event),
                self.wait_seconds.labels(queue),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(duration_s)
        if waited_s is not None:
            children[2].observe(waited_s)

    def portal_answered(self, answer: str) -> None:
        self.portal_calls.labels(answer).inc()

    def portal_waited(self, seconds: float) -> None:
        self.portal_wait_seconds.observe(seconds)

    def portal_refreshed(self) -> None:
        self.portal_refreshes.inc()

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics on its own port (a thread of prometheus_client's)."""
        _start_http_server(port, addr=host, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class OfflineMetrics:
    """`b24queue offline`: records by outcome (a fixed set of labels, never a portal's name)."""

    OUTCOMES = (
        "pulled",
        "published",
        "cleared",
        "errored",
        "unnamed",
        "recovered_batches",
        "failed_pulls",
        "unreadable",
    )

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.records = Counter(
            "b24queue_offline_records",
            "Offline records pulled, published, cleared, marked as errors (event.offline.error), "
            "left reserved for lack of a usable id (unnamed); batches redone after a crash "
            "(recovered_batches); pulls that failed (failed_pulls); gets too large to read even "
            "one record at a time, left reserved (unreadable)",
            ["outcome"],
            registry=self.registry,
        )
        self.portals = Gauge(
            "b24queue_offline_portals", "Portals this process pulls", registry=self.registry
        )
        self.totals = dict.fromkeys(self.OUTCOMES, 0)
        self.unrouted_dropped = unrouted_dropped(self.registry)

    def watch_unrouted(self, cap: DropStats) -> None:
        cap.on_dropped = self.unrouted_dropped.inc

    def count(self, outcome: str, n: int = 1) -> None:
        if n and outcome in self.totals:
            self.totals[outcome] += n
            self.records.labels(outcome).inc(n)

    def serve(self, host: str, port: int) -> None:
        _start_http_server(port, addr=host, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
