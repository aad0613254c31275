"""Users: ONUSERADD (a user invited or registered), with the new user's fields."""

from __future__ import annotations

from b24queue.events.typed.base import Fields, TypedEvent


class UserFields(Fields):
    """`data` of ONUSERADD: the user's fields as `user.get` names them."""

    id: str
    active: str | None = None  # "Y" / "N"
    email: str | None = None
    name: str | None = None
    last_name: str | None = None
    personal_gender: str | None = None
    personal_birthday: str | None = None
    uf_department: list[str] | None = None  # department ids
    date_register: str | None = None
    work_position: str | None = None
    uf_employment_date: str | None = None


class UserAdded(TypedEvent):
    EVENTS = ("ONUSERADD",)
    data: UserFields

    @property
    def id(self) -> str:
        return self.data.id
