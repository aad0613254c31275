"""Deliveries taken straight from aiormq, and their acks put straight on its write queue.

aio-pika's consumer path runs each delivery's callback in a task of aiormq's, wraps it in an
`IncomingMessage` (its properties decoded a second time), and acks through `basic_ack`, which
encodes the frame with pamqp and waits for it to be written, one write (a system call) per ack.
The worker needs none of that: it runs each delivery in a task of its own anyway (so that a
closed channel never cancels a handler halfway), reads the few properties it uses from aiormq's
`DeliveredMessage`, and writes the acks of one turn of the loop together (`Acks`).

The consumer is still registered through aio-pika (`RobustQueue.consume`), which keeps it across
reconnects and consumer cancellations; `take_over` then has the aiormq channel at hand hand that
consumer tag's deliveries to the worker's own callback, straight from its reader. A channel
aio-pika opens anew starts on aio-pika's callback again, and its first delivery takes it over
again.

It reaches into aiormq's internals (through `internals` only), so it is used only with the aiormq
releases it was checked on (`internals.ON.consume`); with any other, every delivery takes
aio-pika's path and `basic_ack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
from collections.abc import Callable
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec

from b24queue.transports.amqp import internals
from b24queue.transports.amqp.internals import closing

log = logging.getLogger(__name__)

# Basic.Ack as a method frame: type 1, channel, size 13; class 60, method 80, the delivery tag,
# the `multiple` bit (never set here); the frame end.
_ACK = struct.Struct(">BHIHHQBB")


def ack_frame(channel_number: int, delivery_tag: int) -> bytes:
    """The bytes `pamqp.frame.marshal(Basic.Ack(delivery_tag), channel_number)` writes."""
    return _ACK.pack(1, channel_number, 13, 60, 80, delivery_tag, 0, 0xCE)


def usable(channel: Any) -> bool:
    """Whether deliveries of this channel can be taken over and acked here."""
    return internals.ON.consume and isinstance(channel, aiormq.Channel)


OnDelivery = Callable[[DeliveredMessage], None]

# Where a channel taken over keeps its consumer tag -> callback map.
DELIVERIES = "_b24queue_deliveries"


def take_over(channel: aiormq.Channel, consumer_tag: str, callback: OnDelivery) -> None:
    """From now on, this channel hands `consumer_tag`'s deliveries to `callback`, which its reader
    calls as each one is read, rather than starting a task of aiormq's for each: the callback
    starts the work in a task of its own. A consumer cancelled (gone from the channel's
    `consumers`) gets nothing more, as with aiormq's own dispatch."""
    callbacks: dict[str, OnDelivery] | None = getattr(channel, DELIVERIES, None)
    if callbacks is None:
        callbacks = {}
        setattr(channel, DELIVERIES, callbacks)
        internals.on_deliver(channel, functools.partial(_deliver, channel, callbacks))
    callbacks[consumer_tag] = callback


async def _deliver(
    channel: aiormq.Channel, callbacks: dict[str, OnDelivery], frame: spec.Basic.Deliver
) -> None:
    # aiormq's `Channel._on_deliver_frame`, with the deliveries of the consumers taken over
    # handed to their callbacks directly.
    message = await internals.read_delivery(channel, frame)
    tag = frame.consumer_tag
    consumer = channel.consumers.get(tag) if tag is not None else None
    if consumer is None:
        if tag is None:
            log.warning("Frame %r has no consumer tag", frame)
        return
    callback = callbacks.get(tag)  # type: ignore[arg-type]
    if callback is None:
        internals.channel_task(channel, consumer(message))
        return
    try:
        callback(message)
    except Exception:  # never into the channel's reader: that would end the channel
        # Handed back to the queue (a quorum queue's delivery limit ends a loop of it), rather
        # than held unacked, a prefetch slot gone, until the channel closes.
        log.exception("delivery %s of %s not started; handed back", frame.delivery_tag, tag)
        if frame.delivery_tag is not None:
            internals.channel_task(channel, channel.basic_nack(frame.delivery_tag, requeue=True))


class Acks:
    """Acks written together at the end of the event loop's turn, one write per channel: the
    writer makes a system call per frame it is given, and a turn often settles several
    deliveries. Not waiting for the write is what `basic_ack` offers too (`wait=False`): the
    broker never answers an ack, and one lost with its connection is a delivery it makes again.

    A channel's acks are checked against its state and enqueued in one step, never later: an
    ack queued behind the channel's Close would reach the broker on a closed channel (which
    closes the whole connection) or, the number reused, on the next one. So when the write queue
    is full they wait here, and are tried again a moment later.
    """

    RETRY_S = 0.001

    def __init__(self) -> None:
        self._waiting: dict[aiormq.Channel, list[int]] = {}
        self._scheduled = False
        self._none_waiting = asyncio.Event()
        self._none_waiting.set()

    def add(self, channel: aiormq.Channel, delivery_tag: int) -> None:
        """Ack one delivery (`multiple` off) at the end of this turn. Raises
        ChannelInvalidStateError on a closed or closing channel, as `basic_ack` does."""
        if closing(channel):
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        tags = self._waiting.get(channel)
        if tags is None:
            self._waiting[channel] = [delivery_tag]
            self._none_waiting.clear()
        else:
            tags.append(delivery_tag)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._write)

    async def written(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until every ack added is on its write queue: before a
        channel is closed, so that its Close does not overtake them."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_waiting.wait(), timeout_s)

    def _write(self) -> None:
        self._scheduled = False
        waiting, self._waiting = self._waiting, {}
        for channel, tags in waiting.items():
            try:
                if closing(channel):  # closed meanwhile: the broker redelivers them
                    log.info("%d acks not sent: their channel closed; redelivered", len(tags))
                    continue
                queue = channel.write_queue
                if queue.full():  # the writer is behind: try again in a moment
                    self._waiting.setdefault(channel, []).extend(tags)
                    continue
                payload = b"".join([ack_frame(channel.number, tag) for tag in tags])
                queue.put_nowait(ChannelFrame(payload=payload, should_close=False))
            except Exception:  # one channel's trouble must not cost the others their acks
                log.exception("%d acks not sent; the broker redelivers them", len(tags))
        if not self._waiting:
            self._none_waiting.set()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self.RETRY_S, self._write)
