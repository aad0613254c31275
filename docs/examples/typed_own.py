"""A typed event of your own: a model for an event b24queue has none for."""

from typing import ClassVar

from b24queue import EventConsumer
from b24queue.events.typed import Fields, TypedEvent


class BookingFields(Fields):
    id: str  # data[ID]: required; any other key of data is kept as sent


class BookingAdded(TypedEvent):
    EVENTS: ClassVar[tuple[str, ...]] = ("ONBOOKINGADD",)  # the names it stands for
    data: BookingFields

    @property
    def id(self) -> str:
        return self.data.id


class Bookings(EventConsumer[BookingAdded]):
    queue = "bookings"
    events = ("ONBOOKINGADD",)

    async def handle(self, event: BookingAdded) -> None:
        await self.portal(event).call("booking.v1.booking.get", {"id": event.id})
