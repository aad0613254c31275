"""A confirmed publish put straight on aiormq's write queue: the same frames, delivery tag and
confirm bookkeeping as `aiormq.Channel.basic_publish`, without its per-call lock, timeout, two
async context managers and pamqp encoding (together about a third of the ingress's CPU per
event, measured), and the publishes of one turn of the loop written together
(docs/performance.md).

It reaches into aiormq's internals (through `internals` only), so it is used only with the
aiormq releases it was written against and checked on (`internals.ON.publish`), whose
`Channel.basic_publish` it mirrors (read line by line: it keeps its order of delivery-tag
increment, confirmation future, message-id map and enqueue); with any other the publisher takes
`basic_publish`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame

from b24queue.events.envelope import Envelope
from b24queue.transports.amqp import internals
from b24queue.transports.amqp.frames import publish_frames
from b24queue.transports.amqp.internals import closing


def usable(channel: aiormq.Channel) -> bool:
    """Whether `publish` can take this channel's publishes (every one of them: a channel's
    publishes go all this way or all aiormq's, see `publish`)."""
    return internals.ON.publish and channel.publisher_confirms


async def publish(channel: aiormq.Channel, exchange: str, envelope: Envelope) -> None:
    """Publish the event (mandatory) and wait for the broker's confirm. Raises what
    `basic_publish` raises for a nack, a return or a closed channel, and ValueError for a
    message the encoder does not cover (`frames`), before anything was sent.

    The publishes that come before aiormq's writer gets to them (those of one turn of the event
    loop, usually) go out together (`_Batch`): one write, one segment for the broker to read,
    where each would be its own.

    Ordering: the broker numbers a channel's publishes in the order they arrive, and aiormq maps
    its confirms by that number, so the number must be taken in wire order. A batch holds the
    channel's lock from its first publish until the writer takes it, and its publishes take their
    numbers in the order they join it; anything else that numbers a publish on the channel
    (aiormq's `basic_publish`, the next batch) waits for the lock, so it follows on the wire.
    """
    payload = publish_frames(
        channel=channel.number,
        max_content_size=channel.max_content_size,
        exchange=exchange,
        routing_key=envelope.routing_key,
        body=envelope.body,
        headers=envelope.headers,
        message_id=envelope.message_id,
        timestamp=envelope.timestamp,
        message_type=envelope.event_type,
    )
    batch: _Batch | None = getattr(channel, _BATCH, None)
    if batch is None or batch.size >= _Batch.MAX_BYTES:
        batch = await _Batch.start(channel)
    elif closing(channel):
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    batch.payloads.append(payload)
    batch.size += len(payload)
    await _confirmed(_numbered(channel, envelope.message_id))


_BATCH = "_b24queue_batch"  # the channel's open batch, kept on the channel: it goes with it


class _Batch:
    """The publishes of one channel that the writer has not taken yet, written together: one
    write, one segment for the broker to read and one round of its work, where each would be
    its own (at a steady 1,300 events/s, a third of the broker's CPU per event, measured).

    A batch is put on the write queue as one frame (`_Frame`) and joined into its bytes only
    when aiormq's writer takes that frame off the queue, so publishes that come meanwhile go out
    in the same write. When it starts on a quiet channel (nothing awaiting a confirm) its frame
    is enqueued at once: the first publish waits for nothing, the rest of the loop's turn joins
    it. On a busy one (earlier publishes await their confirms) it waits `LINGER_S` first, as
    Kafka's producer lingers: under a steady load the events of those milliseconds go to the
    broker together. (Waiting only for the earlier confirm, a group commit, gathered too few at
    a steady 1,300/s: the broker confirms within a millisecond or two there.)

    It holds the channel's lock from its first publish until the writer takes it, and
    publishes join it only until then: nothing else can number a publish in between. One that
    has reached `MAX_BYTES` takes no more: the next publish waits for the lock and starts the
    next one. When the write queue is full (a burst, or a broker that blocked the connection)
    the frame is enqueued a moment later, and publishes join it meanwhile. A channel found
    closing when the frame is taken (or while it waits for room) gets nothing: a publish behind
    the channel's Close would reach the broker on a channel it no longer has, which closes the
    whole connection. Their confirms fail with the channel (aiormq rejects every confirmation
    of a closed one), and the ingress retries them on the new one.
    """

    LINGER_S = 0.003
    RETRY_S = 0.001
    MAX_RETRY_S = 0.01
    MAX_BYTES = 1 << 20

    def __init__(self, channel: aiormq.Channel, lock: asyncio.Lock) -> None:
        self.channel = channel
        self.lock = lock
        self.payloads: list[bytes] = []
        self.size = 0
        self.retry_s = self.RETRY_S
        self.taken = False

    @classmethod
    async def start(cls, channel: aiormq.Channel) -> _Batch:
        if closing(channel):
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        lock = internals.channel_lock(channel)
        waited = lock.locked()
        await lock.acquire()  # at once when free; behind basic_publish or the last batch if not
        if closing(channel):
            lock.release()
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        _watch(channel)
        batch = cls(channel, lock)
        setattr(channel, _BATCH, batch)
        # Not after waiting for the lock: those behind it would each linger in turn.
        if channel.confirmations and not waited:
            asyncio.get_running_loop().call_later(cls.LINGER_S, batch.enqueue)
        else:
            batch.enqueue()
        return batch

    def enqueue(self) -> None:
        """Put the batch's frame on the write queue, or, while it is full, try again shortly."""
        queue: asyncio.Queue[ChannelFrame] = self.channel.write_queue
        if closing(self.channel):
            self.take()
        elif queue.full():
            asyncio.get_running_loop().call_later(self.retry_s, self.enqueue)
            self.retry_s = min(self.retry_s * 2, self.MAX_RETRY_S)
        else:
            queue.put_nowait(_Frame(self))

    def take(self) -> bytes:
        """The batch's bytes, as the writer takes its frame (b"" for a closing channel, and
        after the first time: nothing is written twice): from now on it takes no more
        publishes, and the lock is free for what comes next."""
        if self.taken:
            return b""
        self.taken = True
        if getattr(self.channel, _BATCH, None) is self:
            setattr(self.channel, _BATCH, None)
        self.lock.release()
        payloads, self.payloads = self.payloads, []
        if closing(self.channel) or not payloads:
            return b""
        return payloads[0] if len(payloads) == 1 else b"".join(payloads)


def _watch(channel: aiormq.Channel) -> None:
    """Once per channel: when it closes, its open batch lets go. Its frame may never be taken
    (a connection that dies takes its write queue with it), and publishes waiting for the lock
    must fail now, to be tried again on the next channel, not wait for ever."""
    if getattr(channel, _WATCHED, False):
        return
    setattr(channel, _WATCHED, True)

    def closed(_: object) -> None:
        batch: _Batch | None = getattr(channel, _BATCH, None)
        if batch is not None:
            batch.take()

    channel.closing.add_done_callback(closed)


_WATCHED = "_b24queue_watched"


class _Frame(ChannelFrame):
    """A batch's place on aiormq's write queue: its writer writes `payload`, read as it goes
    (once: so not by the dataclass's repr, eq or hash either)."""

    batch: _Batch
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"<batch of {len(self.batch.payloads)} publishes>"

    def __init__(self, batch: _Batch) -> None:  # (ChannelFrame is a frozen dataclass)
        object.__setattr__(self, "should_close", False)
        object.__setattr__(self, "drain_future", None)
        object.__setattr__(self, "batch", batch)

    @property
    def payload(self) -> bytes:
        return self.batch.take()


def _numbered(channel: aiormq.Channel, message_id: str) -> asyncio.Future[Any]:
    """Give the publish that just joined the channel's batch its delivery tag and confirmation
    future (in the order they join: the order they go out in)."""
    channel.delivery_tag += 1
    tag = channel.delivery_tag
    confirmation = channel.create_future()
    channel.confirmations[tag] = confirmation
    # A return (mandatory, unroutable) names the message by its id: aiormq finds the tag here.
    channel.message_id_delivery_tag[message_id] = tag

    def forget(_: asyncio.Future[Any]) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            del channel.message_id_delivery_tag[message_id]

    confirmation.add_done_callback(forget)
    return confirmation


async def _confirmed(confirmation: asyncio.Future[Any]) -> None:
    """Wait for the confirm. aiormq fails the futures of a channel it closes with the close's
    reason, which can be a CancelledError: that is a lost channel, not our cancellation."""
    try:
        await confirmation
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise aiormq.exceptions.ChannelInvalidStateError("the channel closed") from None
