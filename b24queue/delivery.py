"""The delivery rules, in one place and free of any transport.

For each delivery: decode it, run the handler, and turn what happened into an `Outcome`:
  returned                    -> ack
  raised Reject               -> dead-letter now
  raised Retry / other error  -> retry after the configured delay, or dead-letter once the
                                 attempts are used up
  body is not an Event        -> dead-letter now (retrying cannot fix it)
  not the consumer's model    -> dead-letter now, reason model_mismatch (EventConsumer[Model])
What a handler published (`EventConsumer.publish`) is held in the delivery's outbox and released
(published, confirmed) only on an ack, before the settler acks: a failed attempt publishes
nothing, and a release that fails is a failed attempt (b24queue.publishing).
A `Settler` (the transport's runner) then carries the outcome out. It must make a retry or
dead-letter copy durable (confirmed) before it acks the original, so a crash in between
duplicates, never loses.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from b24queue import _constants as c
from b24queue import bizproc
from b24queue.consumer import EventConsumer
from b24queue.errors import BadEventError, ModelMismatchError
from b24queue.events.envelope import Envelope
from b24queue.events.event import Event, mark_delivered, mismatch
from b24queue.idempotency import SeenStore
from b24queue.publishing import Outbox, close_outbox, open_outbox, outbox_for, release
from b24queue.retry import Reject, Retry, delay_after, snap_delay
from b24queue.secrets.redaction import redact
from b24queue.timeouts import within

log = logging.getLogger(__name__)

OutcomeKind = Literal["ack", "retry", "dead_letter"]


@dataclass(frozen=True, slots=True)
class Incoming:
    """A transport-neutral view of one delivery."""

    body: bytes
    message_id: str | None
    routing_key: str
    headers: Mapping[str, Any]
    redelivered: bool = False
    accepted_at: datetime | None = None  # when the ingress accepted it (the message timestamp)
    replaces: tuple[str, ...] = ()  # earlier events of its key coalesced into it (message_ids)
    # The transport's own object for this delivery (e.g. the AMQP message to ack); opaque here.
    handle: Any = field(default=None, repr=False, compare=False)

    @property
    def attempt(self) -> int:
        """Which attempt this delivery is, from our own header (not x-death)."""
        return attempt_of(self.headers)


def attempt_of(headers: Mapping[str, Any]) -> int:
    """The attempt our own header says (1 when it is missing or not a number)."""
    try:
        return max(1, int(headers.get(c.H_ATTEMPT, 1)))
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    attempt: int
    delay_s: float | None = None
    reason: str | None = None
    error: BaseException | None = None
    headers: dict[str, Any] = field(default_factory=dict)  # for the retry / dead-letter copy
    # What the handler published (`EventConsumer.publish`): durable before the ack, on an ack
    # only (a handler that failed published nothing).
    published: tuple[Envelope, ...] = ()

    @property
    def acked(self) -> bool:
        return self.kind == "ack"

    @property
    def retried(self) -> bool:
        return self.kind == "retry"

    @property
    def dead_lettered(self) -> bool:
        return self.kind == "dead_letter"


class Settler(Protocol):
    """What carries an outcome out on a transport (each transport's runner has one)."""

    async def settle(self, incoming: Incoming, outcome: Outcome) -> None:
        """Carry out the outcome: ack, or make the copy durable and then ack."""


async def decide(consumer: EventConsumer, incoming: Incoming, queue: str) -> Outcome:
    """Run the handler on one delivery and say what must happen to it."""
    attempt = incoming.attempt
    try:
        event = _delivered(incoming, attempt, type(consumer).event_model)
    except ModelMismatchError as exc:
        return _dead_letter(incoming, queue, attempt, "model_mismatch", exc, secrets=())
    except BadEventError as exc:
        return _dead_letter(incoming, queue, attempt, "undecodable", exc, secrets=())
    key = f"{queue}:{incoming.message_id}" if incoming.message_id else None
    store = consumer.idempotency
    # A delivery that replaces earlier events is handled whatever the guard says: its ack
    # settles them too, and its latest event having been handled says nothing of them.
    if await _duplicate(store, key, incoming):
        return Outcome("ack", attempt, reason="duplicate")
    declared = bizproc.declared_of(consumer)
    kept = _NOTHING_KEPT if declared is None else _Kept(incoming.headers, declared)
    outbox = outbox_for(queue, event, incoming.message_id, incoming.headers)
    token = open_outbox(outbox)
    try:
        await _run(consumer, event, declared, kept, lambda: _release(consumer, outbox))
    except Reject as exc:
        outcome = _dead_letter(incoming, queue, attempt, "rejected", exc, _secrets(event.payload))
        return await _told(consumer, declared, event, outcome, kept.json)
    except Exception as exc:  # any handler error is a failed attempt; never an unhandled crash
        return await _failed(consumer, incoming, queue, attempt, exc, event, declared, kept)
    finally:
        close_outbox(token)
    if store is not None and key is not None:
        await _remember(store, key)
    return _acked(attempt, outbox)


def _acked(attempt: int, outbox: Outbox) -> Outcome:
    if outbox.envelopes:
        return Outcome("ack", attempt, headers=_NoHeaders(), published=tuple(outbox.envelopes))
    return _ACKED[attempt] if attempt < len(_ACKED) else Outcome("ack", attempt)


async def _run(
    consumer: EventConsumer,
    event: Event,
    declared: bizproc.Bizproc | None,
    kept: _Kept,
    release: Callable[[], Awaitable[None]],
) -> None:
    """The handler, then its messages made durable (`release`; a failure there fails the
    attempt, and its retry publishes the same ids): before a robot's answer is kept or sent, so
    a retry that only sends the answer never has messages left to publish."""
    if declared is None:
        await _handled(consumer, event)
        await release()
    else:
        await _answered(consumer, event, declared, kept, release)


async def _handled(consumer: EventConsumer, event: Event) -> Any:
    if consumer.handle_timeout_s is None:
        return await consumer.handle(event)
    return await within(consumer.handle_timeout_s, consumer.handle(event))


class _Kept:
    """A robot's answer (its return values as JSON), once known: from an earlier attempt whose
    bizproc.event.send failed (`H_BIZPROC_RESULT`), or from the handler."""

    __slots__ = ("json",)

    def __init__(self, headers: Mapping[str, Any], declared: bizproc.Bizproc | None) -> None:
        kept = headers.get(c.H_BIZPROC_RESULT) if declared is not None else None
        self.json: str | None = kept if isinstance(kept, str) else None


# What an event's delivery keeps (nothing: not a robot's call), shared, never changed.
_NOTHING_KEPT = _Kept({}, None)


async def _answered(
    consumer: EventConsumer,
    event: Event,
    declared: bizproc.Bizproc,
    kept: _Kept,
    release: Callable[[], Awaitable[None]],
) -> None:
    """A robot's or activity's call: the handler's return values sent with bizproc.event.send.
    An answer kept by an earlier attempt is sent again without running the handler again."""
    # An earlier send may have reached the portal with its answer lost (a failed attempt, or a
    # worker that died): the token it spent then makes this one ACCESS_DENIED.
    earlier = kept.json is not None or event.redelivered
    if kept.json is None:
        result = await _handled(consumer, event)
        answer = bizproc.answer_of(declared, result) if declared.use_subscription else None
        await release()
        if answer is None:
            return  # the workflow does not wait: nothing to send
        kept.json = answer
    try:
        await bizproc.send_answer(consumer.portal(event), event, kept.json)
    except bizproc.TokenGone:
        if not earlier:
            raise  # the workflow stopped waiting before any answer: dead-lettered, with it
        log.warning(
            "%s message_id=%s: bizproc.event.send answered ACCESS_DENIED after an earlier send "
            "that may have arrived: taken as answered",
            event.name,
            event.message_id,
        )


async def _told(
    consumer: EventConsumer,
    declared: bizproc.Bizproc | None,
    event: Event,
    outcome: Outcome,
    kept: str | None,
) -> Outcome:
    """A robot's or activity's call dead-lettered: its workflow told as declared, and the dead
    letter says what was done (and keeps the answer the handler gave, if it gave one)."""
    if declared is None:
        return outcome
    if kept is not None:
        outcome.headers[c.H_BIZPROC_RESULT] = kept
    try:
        portal = consumer.portal(event)
    except Exception as exc:
        outcome.headers[c.H_WORKFLOW_TOLD] = f"not told: {type(exc).__name__}"
        return outcome
    reason = outcome.reason or "dead-lettered"
    outcome.headers[c.H_WORKFLOW_TOLD] = await bizproc.give_up(portal, declared, event, reason)
    return outcome


async def _failed(
    consumer: EventConsumer,
    incoming: Incoming,
    queue: str,
    attempt: int,
    exc: Exception,
    event: Event,
    declared: bizproc.Bizproc | None,
    kept: _Kept,
) -> Outcome:
    """A failed attempt: retried after its delay (a robot's answer, once known, kept with the
    retry), or dead-lettered once attempts are used up (a robot's workflow told)."""
    secrets = _secrets(event.payload)
    if attempt >= consumer.max_attempts:
        outcome = _dead_letter(incoming, queue, attempt, "max_attempts", exc, secrets)
        return await _told(consumer, declared, event, outcome, kept.json)
    delay = delay_after(attempt, tuple(consumer.retry_delays_s))
    if isinstance(exc, Retry) and exc.delay_s is not None:
        delay = snap_delay(exc.delay_s, tuple(consumer.retry_delays_s))
    headers = _failure_headers(incoming, queue, exc, secrets)
    headers[c.H_ATTEMPT] = attempt + 1
    if kept.json is not None:
        headers[c.H_BIZPROC_RESULT] = kept.json
    return Outcome("retry", attempt, delay_s=delay, error=exc, headers=headers)


async def _release(consumer: EventConsumer, outbox: Outbox) -> None:
    """A handler's messages, durable (confirmed) before its delivery is acked. Without a
    publisher (b24queue.testing) they are only collected (`Outcome.published`)."""
    if not outbox.envelopes or consumer.outbox_publisher is None:
        return
    try:
        await release(consumer.outbox_publisher, outbox.envelopes)
    except Exception as exc:
        log.warning(
            "message_id=%s: publishing its handler's %d message(s) failed (%r); retried",
            outbox.delivery_id,
            len(outbox.envelopes),
            exc,
        )
        raise


def _text_header(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    return value if isinstance(value, str) and 1 <= len(value) <= 64 else None


async def _duplicate(store: SeenStore | None, key: str | None, incoming: Incoming) -> bool:
    if store is None or key is None or incoming.replaces:
        return False
    return await _already_seen(store, key)


async def _already_seen(store: SeenStore, key: str) -> bool:
    try:
        return await store.seen(key)
    except Exception as exc:  # the guard is best effort: a store outage must not stop delivery
        log.warning("idempotency store unavailable (%r): handling %s anyway", exc, key)
        return False


async def _remember(store: SeenStore, key: str) -> None:
    try:
        await store.remember(key)
    except Exception as exc:
        log.warning("idempotency store unavailable (%r): %s not remembered", exc, key)


class _NoHeaders(dict[str, Any]):
    """The headers of the ack outcomes made once (an ack carries none): shared by every
    delivery, so never to be changed."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the headers of a shared ack outcome are not to be changed")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse


# The outcome of a handler that returned, on its first few attempts (the common case): made once.
_ACKED = tuple(Outcome("ack", attempt, headers=_NoHeaders()) for attempt in range(8))

# queue, event, outcome, seconds it took, seconds it waited (None: not known or not measured)
Observer = Callable[[str, str, str, float, float | None], None]


async def process(
    consumer: EventConsumer,
    incoming: Incoming,
    queue: str,
    settler: Settler,
    observe: Observer | None = None,
) -> Outcome:
    """decide + settle, with one log line per outcome (and the metrics observer, if any)."""
    started = time.perf_counter()
    waited = _waited(incoming) if observe is not None else None
    outcome = await decide(consumer, incoming, queue)
    await settler.settle(incoming, outcome)
    _settled(incoming, queue, outcome, started, observe, waited)
    return outcome


def _waited(incoming: Incoming) -> float | None:
    """Seconds since the ingress accepted a first attempt (the host clocks of the ingress and
    the worker; never below 0); None for a retry, whose wait includes the delay it was given, or
    a message without its acceptance time."""
    accepted = incoming.accepted_at
    if accepted is None or incoming.attempt != 1:
        return None
    return max(0.0, time.time() - accepted.timestamp())


async def give_up(
    incoming: Incoming,
    queue: str,
    settler: Settler,
    deliveries: int,
    observe: Observer | None = None,
    malformed: ValueError | None = None,
    consumer: EventConsumer | None = None,
) -> Outcome:
    """Dead-letter, without running the handler, a message delivered `deliveries` times without
    ever being settled (its handler crashes the worker, or outlives every lease): the delivery
    limit RabbitMQ's quorum queues keep by themselves, for transports that count deliveries.
    With `malformed`: a message the transport cannot read (reason `malformed`). With the
    `consumer` of a robot or activity (b24queue.bizproc), its workflow is told."""
    exc: Exception = malformed or RuntimeError(
        f"delivered {deliveries} times without being settled: the worker died or was stopped "
        "while handling it each time"
    )
    reason = "delivery_limit" if malformed is None else "malformed"
    outcome = _dead_letter(incoming, queue, incoming.attempt, reason, exc, ())
    declared = bizproc.declared_of(consumer) if consumer is not None else None
    if consumer is not None and declared is not None and malformed is None:
        try:
            event = _delivered(incoming, incoming.attempt, type(consumer).event_model)
        except BadEventError:
            pass  # not a call we can answer: the dead letter says why
        else:
            kept = _Kept(incoming.headers, declared).json
            outcome = await _told(consumer, declared, event, outcome, kept)
    started = time.perf_counter()
    await settler.settle(incoming, outcome)
    _settled(incoming, queue, outcome, started, observe)
    return outcome


def _settled(
    incoming: Incoming,
    queue: str,
    outcome: Outcome,
    started: float,
    observe: Observer | None,
    waited: float | None = None,
) -> None:
    """The outcome's log line and its observation (the time since `started`, and the wait
    before it)."""
    duration_s = time.perf_counter() - started
    _log_outcome(incoming, queue, outcome, duration_s)
    if observe is not None:
        observe(queue, incoming.routing_key, outcome.kind, duration_s, waited)


def _decode(incoming: Incoming, model: type[Event] | None) -> Event:
    """The delivery's event, as `model` when the consumer asked for one: `BadEventError` when
    the body is no event at all, `ModelMismatchError` when it is one but does not fit."""
    if model is None:
        return Event.from_json(incoming.body)
    try:
        return model.from_json(incoming.body)
    except BadEventError as exc:
        Event.from_json(incoming.body)  # no event at all: undecodable, as for any consumer
        raise mismatch(model, exc) from None


def _delivered(incoming: Incoming, attempt: int, model: type[Event] | None) -> Event:
    """The delivery's event (as `model`, if any), with what the worker knows of the delivery
    (`BadEventError`, `ModelMismatchError`)."""
    event = _decode(incoming, model)
    digest = incoming.headers.get(c.H_TOKEN_DIGEST)
    mark_delivered(
        event,
        incoming.message_id,
        attempt,
        incoming.redelivered,
        incoming.accepted_at,
        digest if isinstance(digest, str) and len(digest) == 64 else None,
        incoming.replaces,
        _text_header(incoming.headers, c.H_CAUSED_BY),
        _text_header(incoming.headers, c.H_CORRELATION_ID),
    )
    return event


def _dead_letter(
    incoming: Incoming,
    queue: str,
    attempt: int,
    reason: str,
    exc: BaseException,
    secrets: tuple[str, ...],
) -> Outcome:
    headers = _failure_headers(incoming, queue, exc, secrets)
    headers[c.H_ATTEMPT] = attempt
    headers[c.H_DEAD_LETTER_REASON] = reason
    return Outcome("dead_letter", attempt, reason=reason, error=exc, headers=headers)


def _failure_headers(
    incoming: Incoming, queue: str, exc: BaseException, secrets: tuple[str, ...]
) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    # Broker-added history (x-death grows on every retry round trip) is dropped; ours is kept.
    headers = {k: v for k, v in incoming.headers.items() if not _broker_header(k)}
    headers.setdefault(c.H_FIRST_FAILED_AT, now)
    headers[c.H_LAST_FAILED_AT] = now
    headers[c.H_ERROR_TYPE] = type(exc).__qualname__
    # Kept (and shown by `dlq list`): never a secret of the process's or of the event's.
    headers[c.H_ERROR_MESSAGE] = redact(str(exc), secrets)[: c.MAX_ERROR_MESSAGE_CHARS]
    headers.setdefault(c.H_ORIGINAL_ROUTING_KEY, incoming.routing_key)
    headers.setdefault(c.H_ORIGINAL_QUEUE, queue)
    return headers


def _broker_header(name: str) -> bool:
    return name.startswith(c.BROKER_HEADER_PREFIXES) or name == c.DELIVERY_COUNT


def _secrets(payload: Any) -> tuple[str, ...]:
    """The event's own tokens (an error message may quote the request it made with one)."""
    return tuple(_token_values(payload))


def _token_values(node: Any, key: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _token_values(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _token_values(v, key)
    elif isinstance(node, str) and "token" in key.lower() and len(node) >= 4:
        yield node


# The one line per outcome that operators read (and filter on, as fields, in JSON logs). It runs
# for every event, so it skips what `log.info(text, extra={...})` pays per call: no dict of
# extras, no text joined before a handler wants it (the record formats its template lazily), no
# walk up the stack for the caller. The text and the record's fields are what they always were.
_ACK = "event=%s queue=%s message_id=%s attempt=%s outcome=%s duration_ms=%s"
_ACK_REASON = _ACK + " reason=%s"
_FAILED = _ACK + "%s error=%s"


def _log_outcome(incoming: Incoming, queue: str, outcome: Outcome, duration_s: float) -> None:
    kind = outcome.kind
    level = logging.INFO if kind == "ack" else logging.WARNING
    if not log.isEnabledFor(level):
        return
    duration_ms = round(duration_s * 1000, 1)
    event, message_id, attempt = incoming.routing_key, incoming.message_id, outcome.attempt
    error = None
    if kind == "ack":
        if outcome.reason:
            msg = _ACK_REASON
            args: tuple[Any, ...] = (event, queue, message_id, attempt, kind, duration_ms)
            args += (outcome.reason,)
        else:
            msg, args = _ACK, (event, queue, message_id, attempt, kind, duration_ms)
    else:
        error = outcome.headers.get(c.H_ERROR_TYPE, "")
        detail = f" delay_s={outcome.delay_s:g}" if outcome.delay_s is not None else ""
        detail += f" reason={outcome.reason}" if outcome.reason else ""
        msg, args = _FAILED, (event, queue, message_id, attempt, kind, duration_ms, detail, error)
    code = sys._getframe().f_code  # where the line comes from, as findCaller would say
    record = log.makeRecord(
        log.name, level, code.co_filename, code.co_firstlineno, msg, args, None, code.co_name
    )
    record.event = event
    record.queue = queue
    record.message_id = message_id
    record.attempt = attempt
    record.outcome = kind
    record.duration_ms = duration_ms
    if error is not None:
        record.error = error
    log.handle(record)
