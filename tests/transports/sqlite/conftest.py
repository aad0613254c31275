"""The SQLite transport's tests: a database file per test."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from b24queue.settings import load_settings
from tests.support.bench import Bench
from tests.support.samples import SAMPLE_TOKEN


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    """A test's queue in a database file of its own."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        broker_url=f"sqlite:{tmp_path / 'queue.sqlite3'}",
        app_tokens=SAMPLE_TOKEN,
        exchange=f"{prefix}.events",
        unrouted=f"{prefix}.unrouted",
        publish_timeout_s=3.0,
        shutdown_timeout_s=10.0,
        sqlite_poll_s=0.02,
    )
    return Bench(settings, prefix)
