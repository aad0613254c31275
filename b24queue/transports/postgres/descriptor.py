"""PostgreSQL as the settings know it: `postgresql://user:password@host:5432/database`, the
schema holding the queue's tables, and asyncpg (`pip install 'b24queue[postgres]'`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from b24queue.transports.descriptor import TransportDescriptor, needs_authority


class PostgresSettings(BaseModel):
    # The schema holding the queue's tables, and how often an idle worker looks for events
    # anyway (LISTEN/NOTIFY wakes it at once; this covers a notification lost meanwhile).
    # (54 characters at most: its NOTIFY channel, "b24queue.<schema>", must fit in 63 bytes)
    postgres_schema: str = Field(default="b24queue", pattern=r"^[a-z_][a-z0-9_]{0,53}$")
    postgres_poll_s: float = Field(default=1.0, gt=0, le=60)
    # Workers VACUUM the queue's tables past this many dead rows (b24queue.transports.postgres.
    # vacuum); 0: never, autovacuum alone.
    postgres_vacuum_dead_rows: int = Field(default=50_000, ge=0, le=1_000_000_000)


POSTGRES = TransportDescriptor(
    name="postgres",
    schemes=("postgres", "postgresql"),
    shape="postgresql://user:password@host:5432/database (PostgreSQL)",
    settings=PostgresSettings,
    client="asyncpg",
    check_url=needs_authority("postgresql://user:password@host:5432/database"),
)
