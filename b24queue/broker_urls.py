"""B24QUEUE_BROKER_URL and B24QUEUE_AMQP_URL: which transport a URL names and the parts each
transport reads from it (its form for output: b24queue.redaction.redact_url). Pure functions of
the text; `Settings` checks and exposes them."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

_SHAPES = (
    "amqp://user:password@host:5672/vhost (RabbitMQ), postgresql://user:password@host:5432/database"
    " (PostgreSQL), redis://host:6379/0 (Redis Streams), kafka://host:9092 (Kafka) or "
    "sqlite:///path/to/queue.sqlite3 (one host, no server)"
)


def check_broker_url(value: str) -> str:
    """The URL as kept (several AMQP nodes: comma-separated, spaces dropped); ValueError
    saying what it should look like."""
    if not value:
        return value
    scheme = value.split(":", 1)[0].lower()
    if scheme in ("amqp", "amqps"):
        return ",".join(u.strip() for u in value.split(",") if u.strip())
    if scheme == "sqlite" and value.removeprefix("sqlite:").removeprefix("//"):
        return value
    if scheme in ("redis", "rediss"):
        if not value.split(":", 1)[1].startswith("//"):
            raise ValueError("must look like redis://[:password@]host:6379/0")
        return value
    if scheme == "kafka":
        return _check_kafka_url(value)
    if scheme in ("postgres", "postgresql"):
        if not value.split(":", 1)[1].startswith("//"):
            raise ValueError("must look like postgresql://user:password@host:5432/database")
        return value
    raise ValueError(f"unknown transport {scheme!r}: use {_SHAPES}")


def _check_kafka_url(value: str) -> str:
    hosts = value.split("://", 1)[1] if "://" in value else ""
    if not all(h.strip() for h in hosts.rstrip("/").split(",")):
        raise ValueError("must look like kafka://host:9092[,host:9092...]")
    if "@" in hosts:
        raise ValueError(
            "must look like kafka://host:9092[,host:9092...]: b24queue connects to Kafka "
            "without SASL, so a user or password in the URL cannot be used"
        )
    return value


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


def transport_of(url: str) -> str:
    """`amqp`, `sqlite`, `postgres`, `redis` or `kafka`, from the URL's scheme."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("sqlite", "kafka"):
        return scheme
    if scheme in ("redis", "rediss"):
        return "redis"
    return "postgres" if scheme in ("postgres", "postgresql") else "amqp"


def kafka_bootstrap(url: str) -> list[str]:
    """The brokers of a kafka:// URL, `host:port` each (9092 when the port is left out)."""
    hosts = url.split("://", 1)[1].rstrip("/").split(",")
    return [h.strip() if ":" in h.strip() else f"{h.strip()}:9092" for h in hosts]


def sqlite_path(url: str) -> str:
    """The database file of a sqlite: URL (`sqlite:///abs/path` or `sqlite:rel/path`)."""
    rest = url.split(":", 1)[1]
    return rest[2:] if rest.startswith("//") else rest
