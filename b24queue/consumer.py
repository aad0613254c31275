"""`EventConsumer`: the class app developers subclass (what its `handle` raises to retry or
reject an event: b24queue.retry)."""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic

from b24queue import _constants as c
from b24queue.errors import ConfigError
from b24queue.events.event import BINDING, MAX_EVENT_NAME, Event
from b24queue.idempotency import SeenStore
from b24queue.ordering import RULES, STRICT, check_path
from b24queue.publishing import current_outbox

if TYPE_CHECKING:
    # A default for the model (PEP 696; `typing` has it from Python 3.13): a consumer without
    # one, `class Feed(EventConsumer)`, stays what it always was, for type checkers too.
    from typing_extensions import TypeVar

    from b24queue.events.envelope import EventSink
    from b24queue.portal.api import Portal, PortalProvider

    E = TypeVar("E", bound=Event, default=Any)
else:
    E = typing.TypeVar("E", bound=Event)

_QUEUE = re.compile(c.NAME_PATTERN)
MAX_DELAY_S = 7 * 24 * 3600
# RabbitMQ's consumer_timeout (30 min by default) closes the channel of a delivery unacked for
# longer and requeues everything on it: a handler must be stopped well before that.
DEFAULT_HANDLE_TIMEOUT_S = 25 * 60
MAX_PORTAL_WEIGHT = 100


class EventConsumer(Generic[E]):
    """Subclass, set the class attributes, implement `handle`.

    Returning from `handle` acks the event. Raising `Reject` dead-letters it now; raising `Retry`
    or any other exception retries it after `retry_delays_s`, up to `max_attempts` attempts in
    all, then dead-letters it to `<queue>.dlq`.

    `EventConsumer[DealUpdated]` (a typed event of `b24queue.events.typed`, or a model of your
    own subclassing `TypedEvent`) hands `handle` that model, validated; an event that does not
    fit it is dead-lettered at once, reason `model_mismatch` (docs/typed-events.md).
    """

    queue: ClassVar[str] = ""
    events: ClassVar[tuple[str, ...]] = ()
    prefetch: ClassVar[int] = 32
    max_attempts: ClassVar[int] = 5
    retry_delays_s: ClassVar[tuple[float, ...]] = (1, 5, 30, 120, 600)
    handle_timeout_s: ClassVar[float | None] = DEFAULT_HANDLE_TIMEOUT_S
    # Deliveries (not attempts) after which a message is dead-lettered: what stops a message that
    # crashes the worker process from looping forever. On RabbitMQ quorum queues only, set as the
    # queue's policy (operators can change it without a deploy); the database queues count
    # deliveries themselves.
    max_deliveries: ClassVar[int] = 20
    # Opt-in duplicate suppression by message_id (b24queue.idempotency): None = off.
    idempotency: ClassVar[SeenStore | None] = None
    # Handler slots go to the portals (`auth.member_id`) with events waiting in turn, across
    # every worker process of the queue, on the transports that keep it (docs/fairness.md).
    # False: first in, first out across portals.
    fair_share: ClassVar[bool] = True
    # At most this many events of one portal in handlers at once, across all worker processes
    # (None: no cap): for handlers whose work hits that portal's REST limits anyway.
    max_in_flight_per_portal: ClassVar[int | None] = None
    # member_id -> weight (1..100, default 1): a portal of weight 3 gets 3 turns for another's 1.
    portal_weights: ClassVar[Mapping[str, int]] = {}
    # Order within an entity (docs/fairness.md): events of one portal with the same key are never
    # handled at once, across all worker processes, and start in the order the ingress accepted
    # them. A dotted path into the event ("data.FIELDS.ID") or a function of the `Event` giving a
    # short str (or None); an event without a key is not ordered. None: no order (the default).
    ordering_key: ClassVar[str | Callable[[Event], str | None] | None] = None
    # While an event waits for a retry, "strict" holds its key's later events until it is
    # handled or dead-lettered; "lenient" lets them pass (it then runs after them).
    ordering: ClassVar[str] = STRICT
    # With an ordering key: when several events of one key wait, the handler gets the latest,
    # `event.replaces` naming the earlier ones, which are settled with it (for handlers that
    # re-read the entity anyway: one call where there were several).
    coalesce: ClassVar[bool] = False

    # Set by the worker before `on_start`: what `portal(event)` calls the portal with.
    portals: PortalProvider | None = None
    # Set by the worker before `on_start`: where `publish` releases a handler's messages (None:
    # collected only, as b24queue.testing does).
    outbox_publisher: EventSink | None = None

    # What `handle` is given: the model of `EventConsumer[Model]` (None: the plain `Event`).
    # Set from that parameter, not by hand.
    event_model: ClassVar[type[Event] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # `EventConsumer[Model]`, or `Base[Model]` of a generic `Base(EventConsumer[E])` with
        # that one parameter; `Base(EventConsumer[E])` itself has no model yet.
        for base in cls.__dict__.get("__orig_bases__", ()):
            origin, args = typing.get_origin(base), typing.get_args(base)
            generic = isinstance(origin, type) and issubclass(origin, EventConsumer)
            if generic and len(args) == 1 and not isinstance(args[0], typing.TypeVar):
                cls.event_model = None if args[0] is Event else args[0]

    def portal(self, event: Event) -> Portal:
        """A REST client for the event's portal, with that portal's credentials only
        (b24queue.portal): `await self.portal(event).call("crm.deal.get", {"id": 42})`."""
        if self.portals is None:
            raise ConfigError(
                f"{type(self).__name__}.portal(): no portal clients (run it in a Worker)"
            )
        return self.portals.for_event(event)

    async def publish(
        self, name: str, data: Any = None, *, key: str | None = None, delay_s: float = 0
    ) -> str:
        """From `handle`: publish a message of the app's own (`APP.` and words, e.g.
        `APP.DEAL.RECHECK`), which consumers bind like an event. It carries the handled event's
        portal (the next handler's `self.portal(event)` calls it), `caused_by` (this event's
        message id) and the chain's `correlation_id`. Held until the handler returns, then made
        durable before this event is acked; a handler that raises publishes nothing. The message
        id is fixed by this event, this queue, `name` and `key` (or the call's order when no key
        is given): a retry or a redelivery publishes the same ids. `delay_s`: 0 only, for now.
        Returns the message id (docs/publishing.md)."""
        outbox = current_outbox()
        if outbox is None:
            raise ConfigError(
                f"{type(self).__name__}.publish(): only while handling an event; "
                "from elsewhere use b24queue.Producer"
            )
        return outbox.add(name, data, key, delay_s)

    async def handle(self, event: E) -> object:
        """Handle one event; what it returns is ignored (but a `RobotConsumer`'s: its answer)."""
        raise NotImplementedError(f"{type(self).__name__}.handle is not implemented")

    async def on_start(self) -> None:
        """Called once before the first event (open clients, pools...)."""

    async def on_stop(self) -> None:
        """Called once after the last event finished (close what on_start opened)."""

    @classmethod
    def binding_keys(cls) -> tuple[str, ...]:
        """Routing keys and topic patterns, upper-cased as the ingress upper-cases names."""
        return tuple(dict.fromkeys(e.upper() for e in cls.events))

    @classmethod
    def check(cls) -> None:
        """Raise `ConfigError` naming the class and attribute that is wrong."""
        if cls.handle is EventConsumer.handle:
            raise cls._bad("handle", "is not implemented")
        cls._check_queue()
        cls._check_events()
        cls._check_model()
        cls._check_numbers()
        cls._check_fairness()
        cls._check_ordering()

    @classmethod
    def _bad(cls, attr: str, why: str) -> ConfigError:
        return ConfigError(f"{cls.__name__}.{attr} {why}")

    @classmethod
    def _check_queue(cls) -> None:
        queue = cls.queue
        if not isinstance(queue, str) or not _QUEUE.match(queue):
            raise cls._bad(
                "queue", f"must be a queue name (letters, digits, _ . : -), got {queue!r}"
            )
        if queue.startswith("amq.") or ".retry." in queue or queue.endswith(".dlq"):
            raise cls._bad("queue", f"{queue!r} uses a reserved name (amq.*, *.retry.*, *.dlq)")

    @classmethod
    def _check_events(cls) -> None:
        events = cls.events
        if isinstance(events, str) or not isinstance(events, tuple | list) or not events:
            raise cls._bad(
                "events", "must be a non-empty tuple of event names, e.g. ('ONCRMDEALADD',)"
            )
        for event in events:
            if (
                not isinstance(event, str)
                or len(event) > MAX_EVENT_NAME
                or not BINDING.fullmatch(event)
            ):
                raise cls._bad(
                    "events",
                    f"has {event!r}: not an event name (ONCRMDEALADD, CATALOG.PRODUCT.ON.ADD) or "
                    "a topic pattern of dot-separated words, '*' (one word) and '#' (any words)",
                )

    @classmethod
    def _check_model(cls) -> None:
        model = cls.event_model
        if model is None:
            return
        if not (isinstance(model, type) and issubclass(model, Event)):
            raise cls._bad(
                "event_model",
                f"is {model!r}: EventConsumer[...] takes one model, a subclass of Event "
                "(a family's model, e.g. DealEvent, stands for several events)",
            )
        accepts = getattr(model, "EVENTS", ())
        for name in cls.binding_keys():
            exact = "*" not in name and "#" not in name
            if accepts and exact and name not in accepts:
                raise cls._bad(
                    "events",
                    f"has {name}, which its model {model.__name__} does not stand for "
                    f"({', '.join(accepts)}): every such event would be dead-lettered",
                )

    @classmethod
    def _check_numbers(cls) -> None:
        if not isinstance(cls.prefetch, int) or not 1 <= cls.prefetch <= 65535:
            raise cls._bad("prefetch", f"must be an int from 1 to 65535, got {cls.prefetch!r}")
        if not isinstance(cls.max_attempts, int) or cls.max_attempts < 1:
            raise cls._bad("max_attempts", f"must be an int >= 1, got {cls.max_attempts!r}")
        delays = cls.retry_delays_s
        if not isinstance(delays, tuple | list) or not delays:
            raise cls._bad("retry_delays_s", "must be a non-empty tuple of seconds")
        for delay in delays:
            if not isinstance(delay, int | float) or not 0.001 <= delay <= MAX_DELAY_S:
                raise cls._bad(
                    "retry_delays_s", f"has {delay!r}: must be seconds in 0.001..{MAX_DELAY_S}"
                )
        if not isinstance(cls.max_deliveries, int) or cls.max_deliveries < 1:
            raise cls._bad("max_deliveries", f"must be an int >= 1, got {cls.max_deliveries!r}")
        timeout = cls.handle_timeout_s
        if timeout is not None and (not isinstance(timeout, int | float) or not timeout > 0):
            raise cls._bad("handle_timeout_s", f"must be positive seconds or None, got {timeout!r}")

    @classmethod
    def _check_fairness(cls) -> None:
        if not isinstance(cls.fair_share, bool):
            raise cls._bad("fair_share", f"must be True or False, got {cls.fair_share!r}")
        cap = cls.max_in_flight_per_portal
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise cls._bad("max_in_flight_per_portal", f"must be an int >= 1 or None, got {cap!r}")
        if cap is not None and not cls.fair_share:
            raise cls._bad("max_in_flight_per_portal", "needs fair_share = True")
        weights = cls.portal_weights
        if not isinstance(weights, Mapping):
            raise cls._bad("portal_weights", "must be a mapping of member_id to weight")
        for member_id, weight in weights.items():
            if not isinstance(member_id, str) or not member_id:
                raise cls._bad("portal_weights", f"has {member_id!r}: not a member_id")
            if (
                isinstance(weight, bool)
                or not isinstance(weight, int)
                or not 1 <= weight <= MAX_PORTAL_WEIGHT
            ):
                raise cls._bad(
                    "portal_weights",
                    f"gives {member_id!r} {weight!r}: a weight is an int from 1 to "
                    f"{MAX_PORTAL_WEIGHT}",
                )

    @classmethod
    def _check_ordering(cls) -> None:
        key = cls.ordering_key
        if isinstance(key, str):
            why = check_path(key)
            if why is not None:
                raise cls._bad("ordering_key", why)
        elif key is not None and not callable(key):
            raise cls._bad(
                "ordering_key",
                f"must be a dotted path ('data.FIELDS.ID'), a function of the event or None, "
                f"got {key!r}",
            )
        if cls.ordering not in RULES:
            raise cls._bad("ordering", f"must be 'strict' or 'lenient', got {cls.ordering!r}")
        if not isinstance(cls.coalesce, bool):
            raise cls._bad("coalesce", f"must be True or False, got {cls.coalesce!r}")
        if cls.coalesce and key is None:
            raise cls._bad("coalesce", "needs an ordering_key (the events it coalesces share one)")
