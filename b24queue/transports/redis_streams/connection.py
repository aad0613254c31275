"""The Redis Streams transport's connections: how one is made, what means Redis is away, what
its errors mean to b24queue, and the persistence it must have (checked at start)."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis import exceptions as rx

from b24queue.errors import BrokerUnavailableError, ConfigError
from b24queue.settings import Settings
from b24queue.transports.status import MemoryRow

log = logging.getLogger(__name__)

# What means "Redis is away": the client reconnects by itself on the next command.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.BusyLoadingError,
    OSError,
    ConnectionError,
)


def connect(settings: Settings, name: str) -> aioredis.Redis:
    timeout_s = max(settings.connect_timeout_s, settings.publish_timeout_s)
    return aioredis.Redis.from_url(
        settings.broker_url,
        socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=timeout_s,
        client_name=name.replace(" ", "_")[:100],
        health_check_interval=30,
    )


async def check_durable(client: aioredis.Redis, settings: Settings) -> None:
    """A 200 means the event is in the append-only file: refuse to go on without `appendonly
    yes` and `appendfsync always`, unless the operator opted out (then say so loudly)."""
    try:
        aof = (await client.config_get("appendonly")).get("appendonly")
        fsync = (await client.config_get("appendfsync")).get("appendfsync")
        policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
    except rx.ResponseError as exc:
        why = (
            f"cannot read Redis's persistence settings ({exc}): b24queue needs appendonly yes, "
            "appendfsync always and maxmemory-policy noeviction"
        )
    else:
        if (aof, fsync) == ("yes", "always") and not evicts(str(policy)):
            return
        why = (
            f"Redis runs with appendonly {aof}, appendfsync {fsync} and maxmemory-policy "
            f"{policy}: an event answered 200 can be lost when Redis or its host stops, or "
            "evicted when memory is full (b24queue needs appendonly yes, appendfsync always "
            "and maxmemory-policy noeviction)"
        )
    if not settings.redis_allow_unsafe:
        raise ConfigError(why + "; set B24QUEUE_REDIS_ALLOW_UNSAFE=true to run anyway")
    log.error("UNSAFE: %s; running anyway (B24QUEUE_REDIS_ALLOW_UNSAFE=true)", why)


def evicts(policy: str) -> bool:
    """Whether Redis may evict our keys when full: nothing of ours has a TTL, so volatile-*
    policies never touch it (they refuse writes, as noeviction does); allkeys-* would."""
    return not (policy == "noeviction" or policy.startswith("volatile-"))


def full(where: str, memory: MemoryRow | None = None) -> str:
    used = f" ({memory.describe()})" if memory is not None else ""
    return f"Redis at {where} is over its maxmemory{used}: it takes no new events until drained"


def translate(exc: Exception, settings: Settings) -> Exception:
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return ConfigError(f"Redis at {settings.redacted_broker_url()} refused: {exc}")
    if isinstance(exc, rx.OutOfMemoryError):
        return BrokerUnavailableError(full(settings.redacted_broker_url()))
    if isinstance(exc, CONNECTION_ERRORS):
        return BrokerUnavailableError(
            f"cannot reach Redis at {settings.redacted_broker_url()}: {exc!r}"
        )
    return exc
