"""What every typed event shares: `TypedEvent` (an `Event` whose `data` has a model and whose
name is one of its `EVENTS`) and `Fields` (a part of `data` with known keys)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

from b24queue.events.event import Event, register_model


class Fields(BaseModel):
    """A part of an event's `data`: the keys Bitrix24 documents are typed attributes (`id` for
    `ID`), every other key is kept as sent (`model_extra`, and in `model_dump(by_alias=True)`).

    Values stay what Bitrix24 sends: strings (a JSON body's numbers become their decimal
    strings, as the same event sent as a form has them). A documented key may be absent (None):
    portals send what their version has.
    """

    # Attributes are the keys in lower case (`entity_type_id` for `ENTITY_TYPE_ID`); a model
    # whose keys are not upper case says so with its own `alias_generator` or `Field(alias=)`.
    # `defer_build`: a model's validator is built when it first validates, not at import (every
    # process imports them all: built at once, they would cost ~0.15 s of each one's start).
    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        coerce_numbers_to_str=True,
        alias_generator=str.upper,
        defer_build=True,
    )

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a key as Bitrix24 names it (`"ID"`, `"UF_CRM_1"`), known or not."""
        for name, field in type(self).model_fields.items():
            if field.alias == key:
                value = getattr(self, name)
                return default if value is None else value
        extra = self.model_extra or {}
        return extra.get(key, default)


class TypedEvent(Event):
    """An event with a model for its `data`; subclasses name the events they stand for.

    `EVENTS`: the names (upper case) this model accepts; another name does not validate. Each
    model is registered for its names (`Event.typed()`), the most specific one last.
    """

    model_config = ConfigDict(defer_build=True)  # built when first used, as `Fields`
    EVENTS: ClassVar[tuple[str, ...]] = ()

    @field_validator("name")
    @classmethod
    def _check_event(cls, value: str) -> str:
        name = value.upper()
        if cls.EVENTS and name not in cls.EVENTS:
            raise ValueError(f"is {name}, and {cls.__name__} stands for {', '.join(cls.EVENTS)}")
        return name

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "EVENTS" in cls.__dict__:
            register_model(cls, cls.EVENTS)
