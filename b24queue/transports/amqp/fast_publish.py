"""A confirmed publish put straight on aiormq's write queue: the same frames, delivery tag and
confirm bookkeeping as `aiormq.Channel.basic_publish`, without its per-call lock, timeout, two
async context managers and pamqp encoding (together about a third of the ingress's CPU per
event, measured; README, Performance).

It reaches into aiormq's internals, so it is used only with the aiormq releases it was written
against and checked on (`SUPPORTED_AIORMQ`); with any other the publisher takes `basic_publish`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame

from b24queue.envelope import Envelope
from b24queue.transports.amqp.frames import publish_frames

# The releases whose `Channel.basic_publish` this mirrors (7.2.4: read line by line; the fast path
# keeps its order of delivery-tag increment, confirmation future, message-id map and enqueue).
SUPPORTED_AIORMQ = frozenset({"7.2.4"})
_LOCK = "_Channel__lock"  # aiormq.Channel's private asyncio.Lock around basic_publish


def _supported() -> bool:
    try:
        return importlib.metadata.version("aiormq") in SUPPORTED_AIORMQ
    except importlib.metadata.PackageNotFoundError:
        return False


SUPPORTED = _supported()


def usable(channel: aiormq.Channel) -> bool:
    """Whether `publish` can take this channel's publishes (every one of them: a channel's
    publishes go all this way or all aiormq's, see `publish`)."""
    return SUPPORTED and channel.publisher_confirms and hasattr(channel, _LOCK)


async def publish(channel: aiormq.Channel, exchange: str, envelope: Envelope) -> None:
    """Publish the event (mandatory) and wait for the broker's confirm. Raises what
    `basic_publish` raises for a nack, a return or a closed channel, and ValueError for a
    message the encoder does not cover (`frames`), before anything was sent.

    Ordering: the broker numbers a channel's publishes in the order they arrive, and aiormq maps
    its confirms by that number, so the number must be taken in wire order. Most publishes find
    the channel's lock free and room in the write queue: they take the number and enqueue
    without yielding in between. Otherwise (a burst filled the ten-frame queue) they queue
    behind the lock, as basic_publish does, and take the number only once the frame is in.
    """
    frame = ChannelFrame(
        payload=publish_frames(
            channel=channel.number,
            max_content_size=channel.max_content_size,
            exchange=exchange,
            routing_key=envelope.routing_key,
            body=envelope.body,
            headers=envelope.headers,
            message_id=envelope.message_id,
            timestamp=envelope.timestamp,
            message_type=envelope.event_type,
        ),
        should_close=False,
    )
    queue: asyncio.Queue[ChannelFrame] = channel.write_queue
    lock: asyncio.Lock = getattr(channel, _LOCK)
    if lock.locked() or queue.full():
        async with channel.lock:  # raises ChannelInvalidStateError once the channel is closed
            await queue.put(frame)
            confirmation = _numbered(channel, envelope.message_id)
    else:
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        queue.put_nowait(frame)
        confirmation = _numbered(channel, envelope.message_id)
    await _confirmed(confirmation)


def _numbered(channel: aiormq.Channel, message_id: str) -> asyncio.Future[Any]:
    """Give the publish just enqueued its delivery tag and confirmation future."""
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
