"""One test's queue on one transport, for the tests every transport runs (tests/conformance) and
for a transport's own: its settings, its transport, and the real ingress app posting to it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from b24queue.auth.tokens import StaticTokens
from b24queue.ingress.app import create_app
from b24queue.settings import Settings
from b24queue.transports import Transport, connection_name, transport_for
from tests.support.samples import FORM, sample_form
from tests.support.wait import wait_until


class Bench:
    """One test's queue, on one transport."""

    def __init__(self, settings: Settings, prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix
        self.transport: Transport = transport_for(settings)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def with_settings(self, **overrides: Any) -> Settings:
        return self.settings.model_copy(update=overrides)

    @contextlib.asynccontextmanager
    async def ingress(self) -> AsyncIterator[TestClient[Any, Any]]:
        async with self.transport.publisher(connection_name("ingress", self.prefix)) as sink:
            await wait_until(sink.is_ready, 15, "the publisher ready")
            app = create_app(self.settings, sink, StaticTokens(self.settings.app_tokens))
            async with TestClient(TestServer(app)) as client:
                yield client

    async def post(self, *names: str) -> list[str]:
        """Post samples through the real ingress; their message ids, in order."""
        ids = []
        async with self.ingress() as client:
            for name in names:
                resp = await client.post("/b24/events", data=sample_form(name), headers=FORM)
                assert resp.status == 200, await resp.text()
                ids.append((await resp.json())["message_id"])
        return ids
