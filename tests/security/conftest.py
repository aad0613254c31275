"""The security suite: one regression test per finding of the hardening review (issue 11), each
through the real HTTP app, asserting the status, that nothing was published or spooled, and the
bound where there is one. Tests that need the real RabbitMQ use the integration fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from b24queue.auth.tokens import StaticTokens
from b24queue.ingress.app import create_app
from b24queue.settings import load_settings
from tests.support.samples import SAMPLE_TOKEN
from tests.support.sinks import MemorySink


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
async def client(sink: MemorySink) -> AsyncIterator[TestClient[Any, Any]]:
    settings = load_settings(app_tokens=SAMPLE_TOKEN)
    app = create_app(settings, sink, StaticTokens(settings.app_tokens))
    async with TestClient(TestServer(app)) as c:
        yield c
