"""What comes in: the Bitrix24 event as a handler sees it, and how a request's body becomes one
(`event`; its forms: `forms`), and the transport-neutral message the ingress hands to the queue
(`envelope`). `Event` and `Auth` are public here (and in `b24queue`); the typed models of the
common events are in `typed`, imported by whoever uses them (or by `Event.typed()`)."""

from b24queue.events.event import Auth, Event

__all__ = ["Auth", "Event"]
