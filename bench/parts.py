"""Per-event pieces of the ingress and the worker, this tree against a baseline tree, in one
process, interleaved, in CPU time (no broker, no HTTP):

  git archive main b24queue | tar -x -C /tmp/base
  python -m bench.parts --baseline /tmp/base

Each piece runs `--calls` times per round, baseline and this tree in turn, `--rounds` rounds; it
prints each side's range and median in us per call. Log lines go to stderr: send it to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import uvloop

from bench.__main__ import TOKEN, deal_body

ROOT = Path(__file__).resolve().parents[1]
FORM = "application/x-www-form-urlencoded"
EVENT_JSON = (
    b'{"event":"ONCRMDEALUPDATE","data":{"FIELDS":{"ID":"1"}},"ts":"1764367200",'
    b'"auth":{"domain":"acme.bitrix24.com"}}'
)
# Each module the pieces use, as this tree names it, then as older trees did.
MODULES = {
    "delivery": ("delivery",),
    "events": ("events.event", "events"),
    "envelope": ("events.envelope", "envelope"),
    "forms": ("events.forms", "forms"),
    "logs": ("telemetry.logs", "logs"),
    "metrics": ("telemetry.metrics", "metrics"),
    # The AMQP runner's module; an older tree names it `worker`.
    "runner": ("transports.amqp.runner", "transports.amqp.worker"),
}


def load(tree: Path) -> dict[str, ModuleType]:
    """b24queue as found in `tree`, imported afresh (the other tree's modules are put aside)."""
    for name in [n for n in sys.modules if n == "b24queue" or n.startswith("b24queue.")]:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        return {name: _first_of(names) for name, names in MODULES.items()}
    finally:
        sys.path.remove(str(tree))


def _first_of(names: tuple[str, ...]) -> ModuleType:
    for name in names:
        try:
            return importlib.import_module(f"b24queue.{name}")
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(" or ".join(names))


def repeat(fn: Callable[[], Any]) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            fn()

    return run


def pieces(m: dict[str, ModuleType]) -> dict[str, Callable[[int], Any]]:
    """Each piece: a function of n that runs it n times (a coroutine for the async ones)."""
    return {**ingress_pieces(m), **worker_pieces(m)}


def ingress_pieces(m: dict[str, ModuleType]) -> dict[str, Callable[[int], Any]]:
    body = deal_body(TOKEN)
    event = m["events"].parse_event(FORM, body)
    metrics, labels = m["metrics"].IngressMetrics(), m["metrics"].EventLabels()
    count = getattr(metrics, "count_accepted", None) or (lambda e: metrics.accepted.labels(e).inc())
    return {
        "ingress: decode_form": repeat(lambda: m["forms"].decode_form(body)),
        "ingress: parse_event": repeat(lambda: m["events"].parse_event(FORM, body)),
        "ingress: envelope_for": repeat(lambda: m["envelope"].envelope_for(event)),
        "ingress: accepted counter": repeat(lambda: count(labels.of(event.name))),
    }


def worker_pieces(m: dict[str, ModuleType]) -> dict[str, Callable[[int], Any]]:
    delivery = m["delivery"]
    incoming = delivery.Incoming(
        body=EVENT_JSON, message_id="w1", routing_key="ONCRMDEALUPDATE", headers={}
    )
    ack = delivery.Outcome("ack", 1)

    class NoOp(delivery.EventConsumer):  # type: ignore[name-defined,misc]
        queue = "q"
        events = ("#",)
        prefetch = 64  # the burst size below: the broker sends at most prefetch unacked

        async def handle(self, event: Any) -> None:
            pass

    class Settled:
        async def settle(self, incoming: Any, outcome: Any) -> None:
            pass

    async def process(n: int) -> None:
        consumer, settled = NoOp(), Settled()
        for _ in range(n):
            await delivery.process(consumer, incoming, "q", settled, None)

    # As a worker with metrics runs it: the event's acceptance time known, its observations made.
    accepted = delivery.Incoming(
        body=EVENT_JSON,
        message_id="w1",
        routing_key="ONCRMDEALUPDATE",
        headers={},
        accepted_at=datetime.now(UTC),
    )

    async def metered(n: int) -> None:
        consumer, settled, observe = NoOp(), Settled(), m["metrics"].WorkerMetrics().observe
        for _ in range(n):
            await delivery.process(consumer, accepted, "q", settled, observe)

    async def log_lines(n: int) -> None:
        for start in range(0, n, 64):  # a burst of events per turn of the loop, as in a worker
            for _ in range(min(64, n - start)):
                delivery._log_outcome(incoming, "deal-sync", ack, 0.00123)
            await asyncio.sleep(0)

    return {
        "worker: Event.from_json": repeat(lambda: m["events"].Event.from_json(EVENT_JSON)),
        "worker: outcome log line": log_lines,
        "worker: delivery.process": process,
        "worker: delivery.process, metered": metered,
        "worker: runner hand-off": hand_off(m["runner"], NoOp, Settled),
    }


def hand_off(worker: ModuleType, consumer: Any, settled: Any) -> Callable[[int], Any]:
    """A burst of deliveries handed to the runner's own tasks, each one suspending once."""

    async def run(n: int) -> None:
        runner = worker.ConsumerRunner(consumer(), None, None)
        runner._settled = asyncio.get_running_loop().create_future()
        runner._settled.set_result(None)

        async def handle(*_: Any) -> None:
            await asyncio.sleep(0)  # one suspension, as an ack's write may

        if hasattr(runner, "_start"):  # a delivery taken straight from aiormq (fast_consume)
            properties = worker.aiormq.spec.Basic.Properties(message_id="w1")
            # What settles its deliveries (an older tree calls it `_transport`).
            setattr(runner, "_settler" if hasattr(runner, "_settler") else "_transport", settled())
            saved, worker.process = worker.process, handle

            def deliver(i: int) -> None:
                delivery = worker.Delivery(None, i + 1, properties)
                runner._start(EVENT_JSON, "ONCRMDEALUPDATE", {}, False, delivery)
        else:  # an older tree: aio-pika's message, handed to `_handle`
            saved, runner._handle, deliver = None, handle, runner._on_message
        try:
            for start in range(0, n, 64):  # deliveries come in bursts of up to prefetch
                for i in range(min(64, n - start)):
                    deliver(i)
                # No handler left: the in-flight set's event (an older tree: the runner's own).
                await (getattr(runner._tasks, "_idle", None) or runner._idle).wait()
            await runner.drain(0)
        finally:
            if saved is not None:
                worker.process = saved

    return run


def measure(run: Callable[[int], Any], n: int, configure: Callable[[], None]) -> float:
    configure()  # each side's own logging set-up (its formatter is part of the log line's cost)
    started = time.process_time()
    result = run(n)
    if asyncio.iscoroutine(result):
        uvloop.run(result)
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, required=True, help="a tree with b24queue/")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    sides = {}
    for side, tree in (("baseline", args.baseline), ("this tree", ROOT)):
        modules = load(tree)
        sides[side] = (pieces(modules), lambda logs=modules["logs"]: logs.configure("INFO"))
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for side, (runs, configure) in sides.items():
            for name, run in runs.items():
                results.setdefault((name, side), []).append(measure(run, args.calls, configure))
    width = max(len(name) for name, _ in results)
    print(f"us CPU per call, {args.rounds} interleaved rounds of {args.calls}:")
    for name in sides["baseline"][0]:
        line = [f"  {name:<{width}}"]
        for side in sides:
            v = results[(name, side)]
            line.append(f"{side} {min(v):.2f}-{max(v):.2f} (median {statistics.median(v):.2f})")
        print("  ".join(line))


if __name__ == "__main__":
    main()
