"""The fault suite's fixtures: its own RabbitMQ node, a harness per test, and the summary printed
at the end (the harness: tests/support/faults.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import AMQP_URL, NODE_ENV, NODE_NAME, NODE_PORT, SUMMARY, Harness
from tests.support.processes import ROOT


@pytest.fixture(scope="session")
def fault_node() -> Iterator[str]:
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("the fault suite needs rabbitmq-server installed (it runs its own node)")
    data = ROOT / ".broker" / f"node-{NODE_PORT}"
    env = {**os.environ, **NODE_ENV}
    # A node of that name left running (by a killed run, maybe from another clone) goes first:
    # its state (an alarm, a tiny watermark) must not leak into this run.
    subprocess.run(
        ["rabbitmqctl", "-n", NODE_NAME, "-q", "stop"],
        env=env,
        check=False,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        ["bash", "rabbitmq/local-node.sh", "stop"],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
    )
    shutil.rmtree(data, ignore_errors=True)
    subprocess.run(
        ["bash", "rabbitmq/local-node.sh", "start"], cwd=ROOT, env=env, check=True, timeout=180
    )
    try:
        yield AMQP_URL
    finally:
        subprocess.run(
            ["bash", "rabbitmq/local-node.sh", "stop"], cwd=ROOT, env=env, check=False, timeout=120
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARY:
        return
    tr = terminalreporter
    tr.section("fault suite: no accepted event lost")
    cols = ("fault", "sent", "accepted", "refused", "handled", "in_dlq", "lost", "duplicates")
    width = max(len(str(row["fault"])) for row in SUMMARY)
    tr.write_line("  ".join(f"{c:>10}" if i else f"{c:<{width}}" for i, c in enumerate(cols)))
    for row in SUMMARY:
        tr.write_line(
            "  ".join(f"{row[c]:>10}" if i else f"{row[c]:<{width}}" for i, c in enumerate(cols))
        )
    for row in SUMMARY:
        if row.get("note"):
            tr.write_line(f"{row['fault']}: {row['note']}")
    total_lost = sum(r["lost"] for r in SUMMARY)
    tr.write_line(
        f"total: {sum(r['accepted'] for r in SUMMARY)} accepted, {total_lost} lost, "
        f"{sum(r['duplicates'] for r in SUMMARY)} duplicates"
    )


@pytest.fixture
async def harness(fault_node: str, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.stop_all()
