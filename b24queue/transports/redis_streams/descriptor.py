"""Redis Streams as the settings know it: `redis://[:password@]host:6379/0`, the prefix of every
key, and redis-py (`pip install 'b24queue[redis]'`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from b24queue.transports.descriptor import TransportDescriptor, needs_authority


class RedisSettings(BaseModel):
    # The prefix of every key, how often an idle worker looks anyway (a blocking read on the
    # streams wakes it at once), and the opt-out of the persistence check (a 200 then no longer
    # survives a crash of Redis: never in production).
    redis_prefix: str = Field(default="b24queue", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    redis_poll_s: float = Field(default=0.5, gt=0, le=60)
    redis_allow_unsafe: bool = False


REDIS = TransportDescriptor(
    name="redis",
    schemes=("redis", "rediss"),
    shape="redis://host:6379/0 (Redis Streams)",
    settings=RedisSettings,
    client="redis",
    check_url=needs_authority("redis://[:password@]host:6379/0"),
)
