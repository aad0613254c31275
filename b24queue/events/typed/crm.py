"""CRM entities: deals, leads, contacts, companies, quotes, smart-process items
(`ONCRMDYNAMICITEM*`) and activities. Bitrix24 sends only the entity's id
(`data[FIELDS][ID]`; a smart-process item also its `ENTITY_TYPE_ID`): read the rest with
`crm.*.get` through `self.portal(event)`."""

from __future__ import annotations

from typing import ClassVar

from b24queue.events.typed.base import Fields, TypedEvent


class EntityFields(Fields):
    """`data[FIELDS]` of a CRM entity event."""

    id: str


class EntityData(Fields):
    fields: EntityFields


class CrmEntityEvent(TypedEvent):
    """Any event of a CRM entity that names it by `data[FIELDS][ID]`."""

    data: EntityData

    @property
    def fields(self) -> EntityFields:
        return self.data.fields

    @property
    def id(self) -> str:
        """The entity's id (`data[FIELDS][ID]`), as sent: a string of digits."""
        return self.data.fields.id


def _names(entity: str, *actions: str) -> tuple[str, ...]:
    return tuple(f"ONCRM{entity}{action}" for action in actions)


_ACTIONS = ("ADD", "UPDATE", "DELETE")


# Deals
class DealEvent(CrmEntityEvent):
    EVENTS: ClassVar[tuple[str, ...]] = (*_names("DEAL", *_ACTIONS), "ONCRMDEALMOVETOCATEGORY")


class DealAdded(DealEvent):
    EVENTS = _names("DEAL", "ADD")


class DealUpdated(DealEvent):
    EVENTS = _names("DEAL", "UPDATE")


class DealDeleted(DealEvent):
    EVENTS = _names("DEAL", "DELETE")


class DealCategoryFields(EntityFields):
    """`data[FIELDS]` of ONCRMDEALMOVETOCATEGORY: the deal's new funnel and stage."""

    category_id: str | None = None
    stage_id: str | None = None


class DealCategoryData(EntityData):
    fields: DealCategoryFields


class DealMovedToCategory(DealEvent):
    EVENTS = ("ONCRMDEALMOVETOCATEGORY",)
    data: DealCategoryData

    @property
    def fields(self) -> DealCategoryFields:
        return self.data.fields


# Leads
class LeadEvent(CrmEntityEvent):
    EVENTS = _names("LEAD", *_ACTIONS)


class LeadAdded(LeadEvent):
    EVENTS = _names("LEAD", "ADD")


class LeadUpdated(LeadEvent):
    EVENTS = _names("LEAD", "UPDATE")


class LeadDeleted(LeadEvent):
    EVENTS = _names("LEAD", "DELETE")


# Contacts
class ContactEvent(CrmEntityEvent):
    EVENTS = _names("CONTACT", *_ACTIONS)


class ContactAdded(ContactEvent):
    EVENTS = _names("CONTACT", "ADD")


class ContactUpdated(ContactEvent):
    EVENTS = _names("CONTACT", "UPDATE")


class ContactDeleted(ContactEvent):
    EVENTS = _names("CONTACT", "DELETE")


# Companies
class CompanyEvent(CrmEntityEvent):
    EVENTS = _names("COMPANY", *_ACTIONS)


class CompanyAdded(CompanyEvent):
    EVENTS = _names("COMPANY", "ADD")


class CompanyUpdated(CompanyEvent):
    EVENTS = _names("COMPANY", "UPDATE")


class CompanyDeleted(CompanyEvent):
    EVENTS = _names("COMPANY", "DELETE")


# Quotes
class QuoteEvent(CrmEntityEvent):
    EVENTS = _names("QUOTE", *_ACTIONS)


class QuoteAdded(QuoteEvent):
    EVENTS = _names("QUOTE", "ADD")


class QuoteUpdated(QuoteEvent):
    EVENTS = _names("QUOTE", "UPDATE")


class QuoteDeleted(QuoteEvent):
    EVENTS = _names("QUOTE", "DELETE")


# Smart-process items (and the newer CRM entities behind crm.item.*)
class DynamicItemFields(EntityFields):
    """`data[FIELDS]` of a smart-process item: its id and the smart process's
    `ENTITY_TYPE_ID` (the type: 128 and up, e.g. "1220")."""

    entity_type_id: str


class DynamicItemData(EntityData):
    fields: DynamicItemFields


class DynamicItemEvent(CrmEntityEvent):
    EVENTS = _names("DYNAMICITEM", *_ACTIONS)
    data: DynamicItemData

    @property
    def fields(self) -> DynamicItemFields:
        return self.data.fields

    @property
    def entity_type_id(self) -> str:
        return self.data.fields.entity_type_id


class DynamicItemAdded(DynamicItemEvent):
    EVENTS = _names("DYNAMICITEM", "ADD")


class DynamicItemUpdated(DynamicItemEvent):
    EVENTS = _names("DYNAMICITEM", "UPDATE")


class DynamicItemDeleted(DynamicItemEvent):
    EVENTS = _names("DYNAMICITEM", "DELETE")


# Activities (timeline activities: calls, e-mails, meetings, tasks of the CRM)
class ActivityEvent(CrmEntityEvent):
    EVENTS = _names("ACTIVITY", *_ACTIONS)


class ActivityAdded(ActivityEvent):
    EVENTS = _names("ACTIVITY", "ADD")


class ActivityUpdated(ActivityEvent):
    EVENTS = _names("ACTIVITY", "UPDATE")


class ActivityDeleted(ActivityEvent):
    EVENTS = _names("ACTIVITY", "DELETE")
