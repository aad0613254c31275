"""The transport seam: what the ingress, the worker process and the CLI ask of a queue, whichever
it is. The transport is picked by the broker URL's scheme (`B24QUEUE_BROKER_URL`), from the
descriptors of `registry`: `amqp(s)://` RabbitMQ, `sqlite:` the embedded queue, `postgresql://` a
queue in PostgreSQL, `redis://` Redis Streams, `kafka://` Kafka. Nothing here imports a transport's
code (the registry holds only their descriptors): `transport_for` loads the one the settings name.

Each transport keeps the same guarantees (docs/transports/index.md): `publish` returns only once the
event is durable; a runner settles each delivery with `b24queue.delivery` (ack only after the
handler; a retry or dead-letter copy durable before the original goes); declaring is idempotent.

What only some transports can do is an optional capability, a protocol of its own that the
transport's class implements or not (`ExportsDefinitions`, `PlansBindings`,
`DeclaresExchanges`, `SharesByPortal`, `CapsPerPortal`, `OrdersByKey`): the caller asks
`isinstance(transport, Capability)`, never which transport it is.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from b24queue import _constants as c
from b24queue.errors import ConfigError
from b24queue.events.envelope import EventSink
from b24queue.transports import registry

if TYPE_CHECKING:
    from b24queue.consumer import EventConsumer
    from b24queue.queues import BindingChange, DeclaredExchange, DeclaredQueue, QueueSpec
    from b24queue.settings import Settings
    from b24queue.telemetry.metrics import WorkerMetrics
    from b24queue.transports.dead_letters import DeadLetter
    from b24queue.transports.kit.unrouted import UnroutedCap
    from b24queue.transports.status import Status

Progress = Callable[[int, int], None]  # (done, wanted)


def silent(done: int, wanted: int) -> None:
    """The progress of a replay nobody watches."""


class Publisher(EventSink, Protocol):
    """The ingress's sink, as an async context manager (it connects in the background)."""

    # What it drops from the unrouted queue to keep it within its cap (the metric hooks on).
    unrouted: UnroutedCap

    async def __aenter__(self) -> Publisher: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def failed(self) -> BaseException:
        """Return (never raise) why publishing cannot go on for good; wait forever otherwise."""


class Runner(Protocol):
    """One consumer in a worker process."""

    spec: QueueSpec

    @property
    def in_flight(self) -> int: ...

    async def start(self) -> None:
        """Declare what the consumer needs, call `on_start`, begin consuming."""

    async def stop_consuming(self) -> None:
        """Take no new deliveries; in-flight ones go on."""

    async def drain(self, timeout_s: float) -> int:
        """Wait for in-flight handlers, cancel what is left after `timeout_s` (their events are
        delivered again); return how many were cancelled."""

    async def close(self) -> None:
        """`on_stop`, then release what the runner holds."""


class WorkerSession(Protocol):
    """A worker process's hold on the transport (a connection, a database)."""

    def runner(self, consumer: EventConsumer, metrics: WorkerMetrics | None) -> Runner: ...

    async def started(self, runners: Sequence[Runner]) -> None:
        """Every runner consumes (e.g. remove bindings their consumers no longer name)."""

    async def close(self) -> None: ...


class DeadLetters(Protocol):
    """`b24queue dlq` on one queue: a consumer queue, its `.dlq`, or the unrouted queue."""

    source: str  # the queue read from
    destination: str  # where a replay sends them, for the operator

    async def __aenter__(self) -> DeadLetters: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def list(self, limit: int) -> tuple[int, list[DeadLetter]]:
        """(how many there are, the first `limit` described)."""

    async def replay(
        self, *, limit: int | None = None, ids: set[str] | None = None, progress: Progress = silent
    ) -> tuple[int, int]:
        """Send back (durably first, then remove); found ids are taken out of `ids`. Returns
        (replayed, there were)."""

    async def count(self) -> int: ...

    async def purge(self, count: int) -> int:
        """Delete the first `count` (what the operator was shown); newer ones stay."""


class Transport(Protocol):
    name: str
    # True where the queue's server can be away while the ingress runs (the ingress then keeps
    # a local spool); False for an embedded queue on the ingress's own disk.
    needs_spool: bool

    def publisher(self, connection_name: str) -> Publisher: ...

    async def open_workers(self, classes: Sequence[type[EventConsumer]]) -> WorkerSession: ...

    async def declare(self, classes: Sequence[type[EventConsumer]]) -> list[DeclaredQueue]:
        """The topology for these consumers, idempotently; what exists now."""

    async def status(self) -> Status: ...

    def dead_letters(self, queue: str) -> DeadLetters: ...


@runtime_checkable
class ExportsDefinitions(Protocol):
    """A transport whose server can boot from a file describing the topology
    (`b24queue topology --definitions`; no connection needed)."""

    def definitions(self, classes: Sequence[type[EventConsumer]]) -> dict[str, Any]: ...


@runtime_checkable
class PlansBindings(Protocol):
    """A transport that can say, changing nothing, how each consumer queue's bindings differ
    from what its class declares (`b24queue topology --dry-run`)."""

    async def plan_bindings(self, specs: Sequence[QueueSpec]) -> list[BindingChange]: ...


@runtime_checkable
class DeclaresExchanges(Protocol):
    """A transport that routes events through exchanges of its own, declared with its queues
    (`b24queue topology` shows them; on a transport without, the queues are all there is)."""

    def exchanges(self) -> list[DeclaredExchange]: ...


@runtime_checkable
class SharesByPortal(Protocol):
    """A transport whose queue itself gives a consumer's handler slots to the portals with events
    waiting in turn, across every worker process (on Kafka: in the one process that owns a
    portal's partitions; on RabbitMQ: portals of one shard share its turns) (`EventConsumer.
    fair_share`; docs/fairness.md says where each falls short). On the others a queue is first
    in, first out across portals."""

    shares_by_portal: bool


@runtime_checkable
class CapsPerPortal(Protocol):
    """A transport that holds `max_in_flight_per_portal` across every worker process (on Kafka:
    except while a rebalance outlives its wait; docs/fairness.md)."""

    caps_per_portal: bool


@runtime_checkable
class OrdersByKey(Protocol):
    """A transport whose queue keeps a consumer's order within an entity
    (`EventConsumer.ordering_key`, under both rules of `EventConsumer.ordering`): events of one
    portal and key never in handlers at once, across every worker process, and started in the
    order the ingress accepted them (docs/fairness.md)."""

    orders_by_key: bool


def check_fairness(transport: Transport, classes: Sequence[type[EventConsumer]]) -> None:
    """A per-portal cap is a promise about a portal's REST limits, an ordering key one about an
    app's writes: each refused where the transport cannot keep it (the fair share itself is best
    effort there: first in, first out)."""
    for cls in classes:
        if cls.max_in_flight_per_portal is not None and not isinstance(transport, CapsPerPortal):
            raise not_offered(transport, f"{cls.__name__}.max_in_flight_per_portal")
        if cls.ordering_key is not None and not isinstance(transport, OrdersByKey):
            raise not_offered(transport, f"{cls.__name__}.ordering_key")


def not_offered(transport: Transport, what: str) -> ConfigError:
    """The error for asking `transport` for a capability it does not offer."""
    return ConfigError(
        f"{what}: the {transport.name} transport (B24QUEUE_BROKER_URL) does not offer this"
    )


def connection_name(role: str, detail: str = "") -> str:
    """What operators see (management UI, status): role, what it serves, host:pid."""
    middle = f" {detail}" if detail else ""
    return f"{c.CONNECTION_PREFIX}{role}{middle} {socket.gethostname()}:{os.getpid()}"


def worker_connection_name(classes: Sequence[type[EventConsumer]]) -> str:
    """A worker process's connection: the queues of its consumers."""
    return connection_name("worker", ",".join(cls.queue for cls in classes))


def transport_for(settings: Settings) -> Transport:
    """The transport the settings name (its package is imported only now)."""
    descriptor = registry.descriptor_of(settings.broker_url)
    try:
        module = importlib.import_module(descriptor.module)
    except ModuleNotFoundError as exc:
        if not descriptor.client or exc.name != descriptor.client:
            raise
        raise ConfigError(
            f"the {descriptor.name} transport needs {exc.name}: "
            f"pip install 'b24queue[{descriptor.name}]'"
        ) from None
    transport: Transport = module.transport(settings)
    return transport
