"""Fixtures every folder uses; the helpers are in tests/support."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.support.rabbitmq import Broker

# Their asserts explain themselves as a test module's do (pytest rewrites only test modules and
# conftest.py files unless told): the helpers, and the scenarios each transport's classes run.
pytest.register_assert_rewrite("tests.support", "tests.conformance")


@pytest.fixture(autouse=True)
def _clean_b24queue_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests build their own settings: a developer's B24QUEUE_* variables must not leak in."""
    for key in list(os.environ):
        if key.upper().startswith("B24QUEUE_"):
            monkeypatch.delenv(key)
    yield


@pytest.fixture(scope="session")
def portal_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.support.fake_portal import make_certificate

    return make_certificate(tmp_path_factory.mktemp("portal-tls"))


@pytest.fixture
async def fake_portal(portal_certificate: tuple[Path, Path]) -> Any:
    from tests.support.fake_portal import FakePortal

    portal = FakePortal(*portal_certificate)
    await portal.start()
    try:
        yield portal
    finally:
        await portal.stop()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    """A test's own slice of the machine's RabbitMQ (tests/support/rabbitmq.py)."""
    from tests.support.rabbitmq import broker_slice

    async with broker_slice() as b:
        yield b


@pytest.fixture(autouse=True)
async def _no_process_left() -> AsyncIterator[None]:
    """A failing test must not leave the processes it started (tests.support.processes)."""
    yield
    from tests.support.processes import kill_leftovers

    await kill_leftovers()
