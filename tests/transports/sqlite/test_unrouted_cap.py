"""The unrouted queue's cap as `b24queue ingress` itself shows it: its /metrics and its log
(SQLite: no server to start). The cap on every transport: tests/conformance/unrouted_cap.py."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from b24queue.settings import load_settings
from tests.support.processes import env_for, ingress_with, post, stop
from tests.support.proxy import free_port
from tests.support.samples import SAMPLE_TOKEN
from tests.support.unrouted import UNBOUND

pytestmark = pytest.mark.broker


async def test_the_ingress_process_counts_and_logs_what_it_drops(tmp_path: Path) -> None:
    """`b24queue ingress` itself: its /metrics and its log (SQLite: no server to start)."""
    settings = load_settings(
        broker_url=f"sqlite:{tmp_path / 'queue.sqlite3'}", app_tokens=SAMPLE_TOKEN
    )
    env = env_for(settings, tmp_path / "ingress.record", B24QUEUE_UNROUTED_MAX_EVENTS="2")
    port = free_port()
    proc = await ingress_with(env, tmp_path, port)
    try:
        await post(f"http://127.0.0.1:{port}/b24/events", 5, UNBOUND)
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{port}/metrics") as r,
        ):
            text = await r.text()
    finally:
        assert await stop(proc, tmp_path / "ingress.log") == 0
    assert "b24queue_unrouted_dropped_total 3.0" in text, text
    said = (tmp_path / "ingress.log").read_text()
    # One line for the first drop; the next two within LOG_EVERY_S are only counted.
    assert said.count("oldest event(s)") == 1, said
    assert "dropped the 1 oldest event(s)" in said and "B24QUEUE_UNROUTED_MAX_EVENTS" in said
