"""An in-memory stand-in for a transport's publisher: what the ingress app or the offline puller
published, a failure to raise instead, and readiness to report."""

from __future__ import annotations

from b24queue.events.envelope import Envelope


class MemorySink:
    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.fail: Exception | None = None
        self.ready = True

    async def publish(self, envelope: Envelope) -> None:
        if self.fail is not None:
            raise self.fail
        self.published.append(envelope)

    def is_ready(self) -> bool:
        return self.ready
