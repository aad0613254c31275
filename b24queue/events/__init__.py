"""What comes in: the Bitrix24 event as a handler sees it, and how a request's body becomes one
(`event`; its forms: `forms`), and the transport-neutral message the ingress hands to the queue
(`envelope`). `Event` and `Auth` are public here (and in `b24queue`); the typed models of the
common events are in `typed` (imported here, so `Event.typed()` always knows them)."""

from b24queue.events import typed as typed
from b24queue.events.event import Auth, Event

__all__ = ["Auth", "Event"]
