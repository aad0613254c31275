"""Tasks and their comments. Bitrix24 sends the ids only, before and after the change: the
side that does not exist is the string "undefined" (after a delete, before an add)."""

from __future__ import annotations

from typing import ClassVar, Literal, TypeVar

from pydantic import model_validator

from b24queue.events.typed.base import Fields, TypedEvent

# What Bitrix24 sends for the side of a change that does not exist.
Undefined = Literal["undefined"]
F = TypeVar("F", bound=Fields)


class TaskFields(Fields):
    """`FIELDS_BEFORE` / `FIELDS_AFTER` of a task event."""

    id: str


class _Sides(Fields):
    @model_validator(mode="after")
    def _one_side(self) -> _Sides:
        if isinstance(self.fields_after, str) and isinstance(self.fields_before, str):
            raise ValueError("FIELDS_BEFORE or FIELDS_AFTER must hold the fields")
        return self

    fields_before: Fields | Undefined
    fields_after: Fields | Undefined
    is_accessible_before: str | None = None
    is_accessible_after: str | None = None


class TaskData(_Sides):
    fields_before: TaskFields | Undefined
    fields_after: TaskFields | Undefined


class TaskEvent(TypedEvent):
    """ONTASKADD, ONTASKUPDATE, ONTASKDELETE."""

    EVENTS: ClassVar[tuple[str, ...]] = ("ONTASKADD", "ONTASKUPDATE", "ONTASKDELETE")
    data: TaskData

    @property
    def id(self) -> str:
        """The task's id: after the change, or before it for a delete."""
        return _side(self.data.fields_after, self.data.fields_before).id


class TaskAdded(TaskEvent):
    EVENTS = ("ONTASKADD",)


class TaskUpdated(TaskEvent):
    EVENTS = ("ONTASKUPDATE",)


class TaskDeleted(TaskEvent):
    EVENTS = ("ONTASKDELETE",)


class TaskCommentFields(Fields):
    """`FIELDS_BEFORE` / `FIELDS_AFTER` of a task comment event."""

    id: str
    task_id: str
    message_id: str | None = None
    action: str | None = None  # "EDIT", "DEL"


class TaskCommentData(_Sides):
    fields_before: TaskCommentFields | Undefined
    fields_after: TaskCommentFields | Undefined


class TaskCommentEvent(TypedEvent):
    """ONTASKCOMMENTADD, ONTASKCOMMENTUPDATE, ONTASKCOMMENTDELETE."""

    EVENTS: ClassVar[tuple[str, ...]] = (
        "ONTASKCOMMENTADD",
        "ONTASKCOMMENTUPDATE",
        "ONTASKCOMMENTDELETE",
    )
    data: TaskCommentData

    @property
    def id(self) -> str:
        """The comment's id (after the change, else before it)."""
        return self._fields.id

    @property
    def task_id(self) -> str:
        return self._fields.task_id

    @property
    def _fields(self) -> TaskCommentFields:
        return _side(self.data.fields_after, self.data.fields_before)


class TaskCommentAdded(TaskCommentEvent):
    EVENTS = ("ONTASKCOMMENTADD",)


class TaskCommentUpdated(TaskCommentEvent):
    EVENTS = ("ONTASKCOMMENTUPDATE",)


class TaskCommentDeleted(TaskCommentEvent):
    EVENTS = ("ONTASKCOMMENTDELETE",)


def _side(after: F | str, before: F | str) -> F:
    """The fields after the change, or before it (validation made sure one side has them)."""
    if not isinstance(after, str):
        return after
    assert not isinstance(before, str)
    return before
