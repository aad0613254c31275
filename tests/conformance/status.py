"""`b24queue status` shows this host's ingress spools, and the events set aside in them, on every
transport whose ingress spools; the embedded SQLite queue has no spool to show."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from b24queue.cli import status
from b24queue.events.envelope import envelope_for
from b24queue.ingress.spool import Spool
from b24queue.testing import make_event
from tests.support.bench import Bench


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
