"""Calendar: events (entries) and sections (calendars). Bitrix24 sends the id only, as
`data[id]` (lower case): read the rest with `calendar.event.getbyid` / `calendar.section.get`."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from b24queue.events.typed.base import Fields, TypedEvent


class CalendarFields(Fields):
    id: str = Field(alias="id")


class CalendarEvent(TypedEvent):
    data: CalendarFields

    @property
    def id(self) -> str:
        return self.data.id


class CalendarEntryEvent(CalendarEvent):
    EVENTS: ClassVar[tuple[str, ...]] = (
        "ONCALENDARENTRYADD",
        "ONCALENDARENTRYUPDATE",
        "ONCALENDARENTRYDELETE",
    )


class CalendarEntryAdded(CalendarEntryEvent):
    EVENTS = ("ONCALENDARENTRYADD",)


class CalendarEntryUpdated(CalendarEntryEvent):
    EVENTS = ("ONCALENDARENTRYUPDATE",)


class CalendarEntryDeleted(CalendarEntryEvent):
    EVENTS = ("ONCALENDARENTRYDELETE",)


class CalendarSectionEvent(CalendarEvent):
    EVENTS: ClassVar[tuple[str, ...]] = (
        "ONCALENDARSECTIONADD",
        "ONCALENDARSECTIONUPDATE",
        "ONCALENDARSECTIONDELETE",
    )


class CalendarSectionAdded(CalendarSectionEvent):
    EVENTS = ("ONCALENDARSECTIONADD",)


class CalendarSectionUpdated(CalendarSectionEvent):
    EVENTS = ("ONCALENDARSECTIONUPDATE",)


class CalendarSectionDeleted(CalendarSectionEvent):
    EVENTS = ("ONCALENDARSECTIONDELETE",)
