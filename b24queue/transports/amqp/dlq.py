"""Dead letters and unrouted events: list them without losing them, replay them (publish with a
confirm first, then remove: a crash mid-replay duplicates, never loses), purge.

Listing holds the messages unacked and then closes the channel, so the broker puts them back.
It always takes *every* message, even when it shows fewer: returning only some of them would put
those behind the rest. A classic queue then has its order back. A quorum queue does not always:
checked live on RabbitMQ 3.10, more than a few messages returned at once (by closing the channel,
or by nacks, even one by one) come back in hash order, and behind any that arrived meanwhile.
Nothing is lost, but a quorum DLQ that was listed (or replayed by id) is no longer in failure
order. On a quorum queue each listing also counts as a delivery of every message.

Holding is the broker's job: the client keeps no message once it has looked at it (a listing
keeps the descriptions it shows, never a body), so a DLQ of any size costs the tool the same
memory.

Purging deletes exactly the messages counted before the operator said yes: the first N, taken
from the head and acked one by one. Whatever arrived after the count stays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from b24queue import _constants as c
from b24queue.errors import ConfigError, PublishError
from b24queue.settings import Settings
from b24queue.transports import Progress, connection_name, silent
from b24queue.transports.amqp.connection import close_quietly, connect
from b24queue.transports.amqp.publisher import persistent_copy
from b24queue.transports.dead_letters import DeadLetter, fresh_history, letter

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplayRoute:
    """Where a queue's messages go back to when replayed."""

    source: str
    exchange: str  # "" = the default exchange: straight to one queue
    queue: str | None  # the consumer queue, for a DLQ

    def routing_key(self, message: AbstractIncomingMessage) -> str:
        if self.queue is not None:
            return self.queue
        return str(message.routing_key or message.type or "")


def route_for(settings: Settings, name: str) -> ReplayRoute:
    """`deal-sync`, `deal-sync.dlq` or the unrouted queue."""
    if name == settings.unrouted:
        return ReplayRoute(name, settings.exchange, None)
    queue = name.removesuffix(c.DLQ_SUFFIX)
    if not queue:
        raise ConfigError(f"not a queue name: {name!r}")
    return ReplayRoute(queue + c.DLQ_SUFFIX, "", queue)


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    """What an operator needs to see; never the body (it carries tokens)."""
    return letter(
        message.headers or {},
        message_id=message.message_id,
        event=message.type or message.routing_key or "",
        published_at=message.timestamp,
        size_bytes=len(message.body),
    )


def replay_headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    return fresh_history(message.headers or {})


class DeadLetterTool:
    """One connection for one `b24queue dlq` command."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.route = route_for(settings, name)
        self.source = self.route.source
        self.destination = self.route.queue or f"exchange {settings.exchange}"

    async def __aenter__(self) -> DeadLetterTool:
        self._connection = await connect(
            self.settings,
            connection_name("dlq", self.route.source),
            give_up_after_s=self.settings.connect_timeout_s,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await close_quietly(self._connection)

    async def _open(self) -> tuple[AbstractChannel, Any, int]:
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            queue = await channel.declare_queue(self.route.source, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise ConfigError(f"queue {self.route.source!r} does not exist") from None
        return channel, queue, int(queue.declaration_result.message_count or 0)

    async def list(self, limit: int) -> tuple[int, list[DeadLetter]]:
        """(messages in the queue, the first `limit` of them described).

        Every message is taken and held unacked (see the module docstring) but only the first
        `limit` descriptions are kept here; the rest are held by the broker, by delivery tag.
        """
        channel, queue, total = await self._open()
        held = 0
        letters: list[DeadLetter] = []
        try:
            while held < total:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                held += 1
                if len(letters) < limit:
                    letters.append(describe(message))
            return held, letters
        finally:
            # Closing without acks returns every held message, in order.
            await channel.close()

    async def replay(
        self, *, limit: int | None = None, ids: set[str] | None = None, progress: Progress = silent
    ) -> tuple[int, int]:
        """Replay up to `limit` messages (or those with the given ids). Returns (replayed, total).

        Only the messages present when it starts are looked at: a replayed event that fails
        again and comes back to the DLQ meanwhile is not replayed twice in one run.
        """
        channel, queue, total = await self._open()
        wanted = total if limit is None else min(limit, total)
        exchange = (
            channel.default_exchange
            if self.route.exchange == ""
            else await channel.get_exchange(self.route.exchange, ensure=True)
        )
        replayed = 0
        try:
            for _ in range(total):
                # With ids, go on to the end even when all are found: every message not
                # replayed is held and returned together (returned early, a quorum queue would
                # put them behind the rest). Only its delivery tag stays with the broker.
                if ids is None and replayed >= wanted:
                    break
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                if ids is not None:
                    if message.message_id not in ids or replayed >= wanted:
                        continue  # held unacked: it goes back in place when we close
                    ids.discard(message.message_id)
                await self._republish(exchange, message)
                await message.ack()
                replayed += 1
                if replayed % 100 == 0 or replayed == wanted:
                    progress(replayed, wanted)
        finally:
            await channel.close()
        return replayed, total

    async def _republish(self, exchange: Any, message: AbstractIncomingMessage) -> None:
        copy = persistent_copy(message.body, message.properties, replay_headers(message))
        try:
            await exchange.publish(
                copy, routing_key=self.route.routing_key(message), mandatory=True
            )
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishError(
                f"replay stopped: RabbitMQ did not take message_id={message.message_id} "
                f"({exc}); it stays in {self.route.source}"
            ) from None

    async def count(self) -> int:
        channel, _, total = await self._open()
        await channel.close()
        return total

    async def purge(self, count: int) -> int:
        """Delete the first `count` messages (those counted before asking); returns how many.

        Not queue.purge(): that would also delete what arrived after the operator saw the
        count. A crash midway leaves the rest, unacked, back in the queue.
        """
        channel, queue, _ = await self._open()
        purged = 0
        try:
            while purged < count:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break  # someone else took some since the count
                await message.ack()
                purged += 1
        finally:
            await channel.close()
        return purged
