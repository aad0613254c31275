"""RabbitMQ as the settings know it: its URL (`amqp(s)://`, several nodes of one cluster
comma-separated), its management API and its queues' type. The default transport: with no
B24QUEUE_BROKER_URL, B24QUEUE_AMQP_URL names the broker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator

from b24queue.transports.descriptor import TransportDescriptor

if TYPE_CHECKING:
    from b24queue.settings import Settings


def check_broker_url(value: str) -> str:
    """An amqp:// B24QUEUE_BROKER_URL as kept: several nodes comma-separated, spaces dropped."""
    return ",".join(u.strip() for u in value.split(",") if u.strip())


def check_amqp_urls(value: str) -> str:
    """One URL, or several (the nodes of one cluster), comma-separated: the same user,
    password and vhost on each."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    for url in urls or [""]:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(
                "must look like amqp://user:password@host:5672/vhost (several nodes of one "
                "cluster: comma-separated)"
            )

    def who(url: str) -> tuple[str | None, str | None, str]:
        parts = urlsplit(url)
        return parts.username, parts.password, unquote(parts.path.removeprefix("/")) or "/"

    if len({who(u) for u in urls}) > 1:
        raise ValueError("the nodes of one cluster must share the user, password and vhost")
    return ",".join(urls)


class AmqpSettings(BaseModel):
    # B24QUEUE_AMQP_URL is the older name of an amqp:// B24QUEUE_BROKER_URL and keeps working.
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    queue_type: Literal["quorum", "classic"] = "quorum"
    # Quorum queues on a cluster: how many nodes hold each new queue's replicas (RabbitMQ's
    # default when unset: every node, up to its quorum_cluster_size). Read when a queue is
    # created; change existing ones with rabbitmq-queues grow / shrink.
    quorum_group_size: int | None = Field(default=None, ge=1, le=9)
    # Management API (status, dlq tools, policies)
    management_url: str = "http://localhost:15672"

    @model_validator(mode="before")
    @classmethod
    def _broker_url_is_the_amqp_url(cls, data: Any) -> Any:
        """An amqp:// B24QUEUE_BROKER_URL is the AMQP URL (the old name may say the same)."""
        if isinstance(data, dict):
            url = data.get("broker_url") or ""
            if isinstance(url, str) and url.lower().startswith(("amqp://", "amqps://")):
                old = data.get("amqp_url")
                if old and old != url:
                    raise ValueError(
                        "B24QUEUE_BROKER_URL and B24QUEUE_AMQP_URL name different brokers; "
                        "set only B24QUEUE_BROKER_URL"
                    )
                data = {**data, "amqp_url": url}
        return data

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: str) -> str:
        return check_amqp_urls(value)

    @field_validator("management_url")
    @classmethod
    def _check_management_url(cls, value: str) -> str:
        urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
        for url in urls or [""]:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must look like http://host:15672 (several: comma-separated)")
        return ",".join(urls)

    @property
    def amqp_urls(self) -> list[str]:
        """The broker's nodes, in the order to try them."""
        return self.amqp_url.split(",")

    @property
    def management_urls(self) -> list[str]:
        """The management API of each node (any answers for the cluster)."""
        return self.management_url.split(",")

    @property
    def vhost(self) -> str:
        """The vhost named in the URL's path, percent-decoded (`/%2F` is `/`), as aio-pika reads
        it; `/` when the path is empty."""
        path = urlsplit(self.amqp_urls[0]).path.removeprefix("/")
        return unquote(path) or "/"

    @property
    def broker_credentials(self) -> tuple[str, str]:
        """User and password of the AMQP URL, percent-decoded (`p%40ss` is `p@ss`), as
        aio-pika (yarl) decodes them for the AMQP login; guest/guest when absent, as there."""
        parts = urlsplit(self.amqp_urls[0])
        return unquote(parts.username or "") or "guest", unquote(parts.password or "") or "guest"


def _amqp_url(settings: Settings) -> str:
    return settings.amqp_url


AMQP = TransportDescriptor(
    name="amqp",
    schemes=("amqp", "amqps"),
    shape="amqp://user:password@host:5672/vhost (RabbitMQ)",
    settings=AmqpSettings,
    check_url=check_broker_url,
    server_url=_amqp_url,
    secret_urls=("amqp_url", "management_url"),
)
