"""Consumers for the worker benchmark, each run as its own process on a pre-filled queue:

  plain     a plain aio-pika consume-and-ack loop (same prefetch)
  b24queue  b24queue's Worker with a no-op EventConsumer
Prints one JSON line: how long it took to ack `--count` messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aio_pika

from b24queue import Event, EventConsumer
from b24queue.commands import loop_factory
from b24queue.runtime import Worker
from b24queue.settings import load_settings


async def plain(amqp_url: str, queue_name: str, count: int, prefetch: int) -> float:
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(queue_name)
    done = asyncio.Event()
    seen = 0
    started = 0.0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen, started
        if seen == 0:
            started = time.perf_counter()
        json.loads(message.body)
        await message.ack()
        seen += 1
        if seen >= count:
            done.set()

    await queue.consume(on_message)
    await done.wait()
    elapsed = time.perf_counter() - started
    await connection.close()
    return elapsed


async def ours(args: argparse.Namespace) -> float:
    done = asyncio.Event()
    seen = 0
    started = 0.0

    class NoOp(EventConsumer):
        queue = args.queue
        events = (args.binding,)
        prefetch = args.prefetch

        async def handle(self, event: Event) -> None:
            nonlocal seen, started
            if seen == 0:
                started = time.perf_counter()
            seen += 1
            if seen >= args.count:
                done.set()

    settings = load_settings(
        amqp_url=args.amqp_url, exchange=args.exchange, unrouted=args.unrouted, log_level="WARNING"
    )
    async with Worker(settings, [NoOp]):
        await done.wait()
        # The last acks are sent right after handle() returns; wait for the queue to be empty.
        elapsed = time.perf_counter() - started
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("plain", "b24queue"))
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", default="b24.events")
    parser.add_argument("--unrouted", default="b24.unrouted")
    parser.add_argument("--binding", default="#")
    args = parser.parse_args()
    if args.kind == "plain":
        elapsed = asyncio.run(plain(args.amqp_url, args.queue, args.count, args.prefetch))
    else:
        # As `b24queue worker` runs it: with the CLI's event loop (uvloop where installed).
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            elapsed = runner.run(ours(args))
    print(
        json.dumps(
            {
                "count": args.count,
                "seconds": round(elapsed, 3),
                "per_s": round(args.count / elapsed, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
