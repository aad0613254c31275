import logging

from b24queue import Event, EventConsumer
from b24queue.idempotency import MemorySeenStore

log = logging.getLogger(__name__)


class DealSync(EventConsumer):
    queue = "deal-sync"
    events = ("ONCRMDEALADD",)
    # One process: MemorySeenStore(). Several workers: RedisSeenStore("redis://localhost:6379/0")
    # (also in b24queue.idempotency; pip install 'b24queue[redis]').
    idempotency = MemorySeenStore()

    async def handle(self, event: Event) -> None:
        # Runs once per message_id handled successfully; a copy is acked without running this.
        log.info("deal %s synced", event.data["FIELDS"]["ID"])
