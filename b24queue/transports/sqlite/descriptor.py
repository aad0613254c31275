"""The embedded SQLite queue as the settings know it: `sqlite:///abs/path` or `sqlite:rel/path`,
no server and no client library beyond Python's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from b24queue.transports.descriptor import TransportDescriptor

SHAPE = "sqlite:///path/to/queue.sqlite3"


def check_url(value: str) -> str:
    if not value.removeprefix("sqlite:").removeprefix("//"):
        raise ValueError(f"must look like {SHAPE} or sqlite:relative/path (a file to use)")
    return value


class SqliteSettings(BaseModel):
    # How often an idle worker looks for events published by another process (a read).
    sqlite_poll_s: float = Field(default=0.05, gt=0, le=10)

    if TYPE_CHECKING:
        broker_url: str

    @property
    def sqlite_path(self) -> str:
        """The database file of a sqlite: URL (`sqlite:///abs/path` or `sqlite:rel/path`)."""
        rest = self.broker_url.split(":", 1)[1]
        return rest[2:] if rest.startswith("//") else rest


SQLITE = TransportDescriptor(
    name="sqlite",
    schemes=("sqlite",),
    shape=f"{SHAPE} (one host, no server)",
    settings=SqliteSettings,
    check_url=check_url,
)
