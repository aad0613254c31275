"""Every use of aiormq's and aio-pika's private names, in one place, with the releases it was
checked against.

Four things reach past the clients' public API: the direct publish (`fast_publish`), the direct
deliveries and acks (`fast_consume`), the blocked-connection check (`blocked`, the publisher's)
and the cluster failover (`connection.FailoverConnection`, through `ConnectionHooks`). They do so
only through this module, and each only with a release listed here, read line by line against the
private code it relies on (`ON`, from `paths`). With any other release each takes the public way
(aiormq's `basic_publish`, aio-pika's consumer path and `basic_ack`, `Connection.ready()` for the
blocked check; failover alone has none: every (re)connection goes to the first node), and
`warn_if_off` says so at start. pyproject pins both clients to these releases, and
tests/transports/amqp/test_internals.py fails when the installed ones would leave a path off or a
private name used here is gone.

A release is added to `TESTED_AIORMQ` / `TESTED_AIO_PIKA` (and to pyproject's pins) only after
reading what changed in the code these names point into, then running the tests of these paths.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

log = logging.getLogger(__name__)

TESTED_AIORMQ = frozenset({"7.2.4"})
TESTED_AIO_PIKA = frozenset({"10.2.1"})

# aiormq.Channel's, set in its __init__: the asyncio.Lock `basic_publish` numbers a publish under,
# and the Event it sets as soon as the channel starts closing.
CHANNEL_LOCK = "_Channel__lock"
CLOSE_EVENT = "_Channel__close_event"
# aiormq.Channel's methods: what its reader awaits for each Basic.Deliver, the two steps that read
# a delivery's header and body, and the callback that logs a failed consumer task.
ON_DELIVER = "_on_deliver_frame"
CONTENT_HEADER = "_Channel__get_content_header"
READ_CONTENT = "_read_content"
CONSUMER_DONE = "_on_consumer_done"
# aiormq.Connection's, set in its __init__: cleared by a Connection.Blocked, set by an Unblocked.
UNBLOCKED = "_Connection__connection_unblocked"
# aio_pika.RobustConnection's: one (re)connection attempt to `self.url`; and the callback every
# connection's end reaches (aio_pika.Connection's, extended by RobustConnection).
CONNECT_TRANSPORT = "_RobustConnection__connect_transport"
ON_CONNECTION_CLOSE = "_on_connection_close"

# What each of the above belongs to, for the test that they are all still there.
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    "aiormq.Channel (instance)": (CHANNEL_LOCK, CLOSE_EVENT),
    "aiormq.Channel": (ON_DELIVER, CONTENT_HEADER, READ_CONTENT, CONSUMER_DONE),
    "aiormq.Connection (instance)": (UNBLOCKED,),
    "aio_pika.RobustConnection": (CONNECT_TRANSPORT, ON_CONNECTION_CLOSE),
}


def installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Paths:
    """Which of the private paths are on."""

    publish: bool  # `fast_publish`
    consume: bool  # `fast_consume`
    blocked_flag: bool  # `blocked` reads aiormq's own flag (off: asks `Connection.ready()`)
    failover: bool  # `ConnectionHooks` (off: every (re)connection to the first node)


def paths(aiormq_version: str | None, aio_pika_version: str | None) -> Paths:
    """The paths that are on with these releases: those of the releases they were checked on."""
    aiormq_tested = aiormq_version in TESTED_AIORMQ
    return Paths(
        publish=aiormq_tested,
        consume=aiormq_tested,
        blocked_flag=aiormq_tested,
        failover=aio_pika_version in TESTED_AIO_PIKA,
    )


INSTALLED = {"aiormq": installed("aiormq"), "aio-pika": installed("aio-pika")}
ON = paths(INSTALLED["aiormq"], INSTALLED["aio-pika"])

# Each path: its distribution, its tested releases, and what runs instead when it is off.
_OFF = {
    "publish": (
        "the direct publish path",
        "aiormq",
        TESTED_AIORMQ,
        "publishes take aiormq's basic_publish: more CPU per event",
    ),
    "consume": (
        "the direct delivery path",
        "aiormq",
        TESTED_AIORMQ,
        "deliveries take aio-pika's path and basic_ack: more CPU per message",
    ),
    "blocked_flag": (
        "the blocked-connection flag",
        "aiormq",
        TESTED_AIORMQ,
        "the check asks Connection.ready() instead: the same answer, a little more CPU",
    ),
    "failover": (
        "the cluster failover",
        "aio-pika",
        TESTED_AIO_PIKA,
        "every (re)connection goes to the first node of B24QUEUE_AMQP_URL",
    ),
}


def off(on: Paths, *, several_nodes: bool) -> list[str]:
    """One line per path that is off (the failover only where there are nodes to fail over to):
    the path, the installed release, the tested ones, and what runs instead."""
    lines = []
    for field, (path, distribution, tested, instead) in _OFF.items():
        if getattr(on, field) or (field == "failover" and not several_nodes):
            continue
        found = INSTALLED[distribution] or "(not found)"
        lines.append(
            f"{path} is off: {distribution} {found} is installed, it was tested with "
            f"{', '.join(sorted(tested))} only ({instead})"
        )
    return lines


_warned = False


def warn_if_off(*, several_nodes: bool) -> None:
    """A WARNING per path that is off, once per process (the ingress and the worker call this
    as they start)."""
    global _warned
    if _warned:
        return
    _warned = True
    for line in off(ON, several_nodes=several_nodes):
        log.warning("%s; the releases pyproject pins have it on", line)


# -- aiormq.Channel: the direct publish and deliveries (used only while ON.publish/ON.consume) --


def channel_lock(channel: aiormq.Channel) -> asyncio.Lock:
    """The lock `basic_publish` numbers its publish under (the public `channel.lock` is a context
    manager: a batch holds the lock itself, from its first publish until the writer takes it)."""
    lock: asyncio.Lock = getattr(channel, CHANNEL_LOCK)
    return lock


def closing(channel: aiormq.Channel) -> bool:
    """The channel is closed or closing: a frame enqueued now could reach the broker behind the
    channel's Close, on a channel it no longer has, which closes the whole connection."""
    return bool(channel.is_closed or getattr(channel, CLOSE_EVENT).is_set())


def on_deliver(
    channel: aiormq.Channel, dispatch: Callable[[spec.Basic.Deliver], Awaitable[None]]
) -> None:
    """From now on the channel's reader awaits `dispatch` for each Basic.Deliver, in place of
    aiormq's own (which reads the delivery and starts a task of the channel's per consumer)."""
    setattr(channel, ON_DELIVER, dispatch)


async def read_delivery(channel: aiormq.Channel, frame: spec.Basic.Deliver) -> DeliveredMessage:
    """The delivery that `frame` begins: its header and body, read from the channel's frames as
    aiormq's own dispatch reads them."""
    header = await getattr(channel, CONTENT_HEADER)()
    message: DeliveredMessage = await getattr(channel, READ_CONTENT)(frame, header)
    return message


def channel_task(channel: aiormq.Channel, work: Coroutine[Any, Any, Any]) -> None:
    """Run `work` in a task of the channel's (cancelled with it), its failure logged as aiormq
    logs a failed consumer's."""
    task = channel.create_task(work)
    task.add_done_callback(getattr(channel, CONSUMER_DONE))


# -- aiormq.Connection: blocked by the broker --


def blocked(connection: aiormq.abc.AbstractConnection) -> bool:
    """RabbitMQ blocked this connection (a memory or disk alarm), and has not unblocked it since.

    aiormq keeps that in a private Event, read directly with the releases it was checked on.
    With any other, the public `Connection.ready()` (connected, and that Event set) is asked
    without waiting: started, it either finishes at once or waits, and it waits just while the
    connection is blocked (aiormq sets `connected` once, before any frame is read, and never
    clears it; aio-pika hands out a connection only once it is ready).
    """
    if ON.blocked_flag:
        unblocked = getattr(connection, UNBLOCKED, None)
        if isinstance(unblocked, asyncio.Event):
            return not unblocked.is_set()
    probe = connection.ready()
    try:
        probe.send(None)
    except StopIteration:
        return False  # finished without waiting
    finally:
        probe.close()  # (a no-op once finished; else its wait is given up, nothing left behind)
    return True


# -- aio_pika.RobustConnection: each (re)connection --


class ConnectionHooks(aio_pika.RobustConnection):
    """aio-pika's robust connection with two of its private steps as methods to override:
    `connect_attempt`, each (re)connection (to `self.url`), and `lost`, the open connection went
    away (not closed by us). With an aio-pika release not in `TESTED_AIO_PIKA` neither is called,
    and it is aio-pika's RobustConnection as it is."""

    async def connect_attempt(self) -> None:
        await getattr(super(), CONNECT_TRANSPORT)()

    def lost(self) -> None:
        """Called as the connection that was open goes away, before aio-pika reconnects."""

    if ON.failover:

        async def _RobustConnection__connect_transport(self) -> None:
            await self.connect_attempt()

        async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
            if self.connected.is_set() and not (self.close_called or self.is_closed):
                self.lost()
            await super()._on_connection_close(closing)
