"""`b24queue status` shows this host's ingress spools, and the events set aside in them, on every
transport whose ingress spools; the embedded SQLite queue has no spool to show. And, on the
transports that can tell (`counts_portals`), the portals with events waiting in each consumer
queue and the few with the most; the others show "-"."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from b24queue import EventConsumer
from b24queue import _constants as c
from b24queue.cli import status
from b24queue.events.envelope import envelope_for
from b24queue.ingress.spool import Spool
from b24queue.testing import make_event
from tests.conformance.fairness import envelope, publish
from tests.support.bench import Bench
from tests.support.consumers import consumer

A, B, C = ("a" * 32, "b" * 32, "c" * 32)
# A member_id no ingress lets through (it takes letters, digits and _), in a row put there some
# other way: escape sequences (clear the screen, retitle the window), a line break, a
# right-to-left override, and longer than the queue keeps of a portal (64 characters).
HOSTILE = "\x1b[2J\x1b]0;owned\x07\n\u202e" + "z" * 80


async def _idle(self: EventConsumer, event: Any) -> None:
    return None


def run_status(bench: Bench, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    args = argparse.Namespace(json="--json" in flags, fail_on_dead_letters=False)
    assert status.run(bench.settings, args) == 0
    return capsys.readouterr().out


@pytest.mark.broker
class StatusScenarios:
    """Each transport's `TestStatusOn<Transport>` runs these on its own `bench` fixture."""

    async def test_the_spool_and_its_quarantine_wherever_the_ingress_spools(
        self, bench: Bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = tmp_path / "spool.sqlite3"
        async with Spool(path, 10) as spool:  # as an ingress leaves it: one waiting, one aside
            for i in (1, 2):
                event = make_event("ONCRMDEALADD", {"FIELDS": {"ID": str(i)}})
                await spool.put(envelope_for(event))
            [(row_id, _), _] = await spool.oldest(2)
            await spool.quarantine(row_id, "refused (test)")
        settings = bench.with_settings(spool_path=str(path))
        await bench.transport.declare([])  # the unrouted queue, whatever else status reads
        args = argparse.Namespace(json=False, fail_on_dead_letters=True)

        code = await asyncio.to_thread(status.run, settings, args)

        out = capsys.readouterr().out
        if bench.transport.needs_spool:
            assert f"spool {path}: 1 waiting" in out and ", 1 quarantined" in out, out
            assert f"spool {path} holds 1 quarantined" in out, out
            assert code == 1  # a quarantined event fails --fail-on-dead-letters
        else:
            assert "spool" not in out, out
            assert code == 0

    counts_portals = False  # this transport's status tells the portals waiting in a queue

    async def test_the_portals_waiting_and_those_with_the_most(
        self, bench: Bench, capsys: pytest.CaptureFixture[str]
    ) -> None:
        busy, empty = bench.name("busy"), bench.name("empty")
        await bench.transport.declare(
            [consumer(busy, ("ONCRMDEALADD",), _idle), consumer(empty, ("ONTASKADD",), _idle)]
        )
        await publish(bench, envelope(B, 3) + envelope(A, 5) + envelope(C, 1))

        out = await asyncio.to_thread(run_status, bench, capsys, "--json")
        rows = {r["queue"]: r for r in json.loads(out)["queues"]}
        text = await asyncio.to_thread(run_status, bench, capsys)

        if not self.counts_portals:
            assert all(r["portals"] is None for r in rows.values()), rows
            return
        top = [{"portal": p, "waiting": n, "more": False} for p, n in ((A, 5), (B, 3), (C, 1))]
        assert rows[busy]["portals"] == {"count": 3, "more": False, "top": top}
        assert rows[empty]["portals"] == {"count": 0, "more": False, "top": []}
        header, *lines = text.splitlines()
        assert header.split()[-1] == "PORTALS", text
        [busy_line] = [ln for ln in lines if ln.startswith(busy + " ")]
        [empty_line] = [ln for ln in lines if ln.startswith(empty + " ")]
        assert busy_line.split()[-1] == "3" and empty_line.split()[-1] == "0", text
        assert f"  {busy}: {A} 5, {B} 3, {C} 1" in lines, text

    async def test_a_hostile_portal_is_printed_safe_and_bounded(
        self, bench: Bench, capsys: pytest.CaptureFixture[str]
    ) -> None:
        if not self.counts_portals:
            pytest.skip(f"the {bench.transport.name} transport does not count portals")
        queue = bench.name("hostile")
        await bench.transport.declare([consumer(queue, ("ONCRMDEALADD",), _idle)])
        [e] = envelope(A)
        await publish(
            bench, [dataclasses.replace(e, headers={**e.headers, c.H_MEMBER_ID: HOSTILE})]
        )

        out = await asyncio.to_thread(run_status, bench, capsys, "--json")
        text = await asyncio.to_thread(run_status, bench, capsys)

        [row] = [r for r in json.loads(out)["queues"] if r["queue"] == queue]
        assert row["portals"]["top"] == [{"portal": HOSTILE[:64], "waiting": 1, "more": False}]
        assert not any(ch in text for ch in "\x1b\x07\u202e"), text
        # Its first 64 characters (16 before the z's), each control written as an escape.
        shown = "\\x1b[2J\\x1b]0;owned\\x07\\x0a\\u202e" + "z" * (64 - 16) + " 1"
        assert f"  {queue}: {shown}" in text.splitlines(), text
