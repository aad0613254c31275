"""All configuration in one frozen object, read from `B24QUEUE_*` environment variables.

Unknown `B24QUEUE_*` variables are an error rather than silently ignored: a typo such as
`B24QUEUE_APP_TOKEN` (missing S) must not turn verification into "no tokens configured".
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from b24queue import _constants as c
from b24queue.errors import ConfigError
from b24queue.outbound.answers import VALUE_BYTES, Bounds
from b24queue.secrets.redaction import WEBHOOK_PATH, redact_url, url_secrets
from b24queue.secrets.stores import REDIS_URL_PREFIXES
from b24queue.transports import registry
from b24queue.transports.registry import TransportSettings

ENV_PREFIX = "B24QUEUE_"

_NAME_PATTERN = c.NAME_PATTERN

# Bitrix24 cloud portals (`*` is exactly one label). Self-hosted portals: set your domains.
DEFAULT_PORTAL_DOMAINS = tuple(
    f"*.bitrix24.{tld}"
    for tld in (
        "com",
        "ru",
        "de",
        "eu",
        "es",
        "fr",
        "it",
        "pl",
        "ua",
        "by",
        "kz",
        "in",
        "uk",
        "com.br",
        "com.tr",
        "vn",
        "id",
        "jp",
        "cn",
        "co",
        "mx",
    )
)


class Settings(TransportSettings, BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, case_sensitive=False
    )

    # The queue. B24QUEUE_BROKER_URL's scheme picks the transport (b24queue.transports.registry):
    # amqp(s):// RabbitMQ, the default (an empty URL: B24QUEUE_AMQP_URL), sqlite:///abs/path or
    # sqlite:rel/path an embedded queue on one host, postgresql://user:password@host:5432/db a
    # queue in PostgreSQL, redis://host:6379/0 Redis Streams, kafka://host:9092[,host:9092...]
    # Kafka. Each transport's own settings (B24QUEUE_AMQP_URL, B24QUEUE_POSTGRES_SCHEMA...) are
    # in its descriptor, `TransportSettings`.
    broker_url: str = ""
    exchange: str = Field(default="b24.events", pattern=_NAME_PATTERN)
    unrouted: str = Field(
        default="b24.unrouted",
        pattern=_NAME_PATTERN,
        description="alternate exchange and its queue: events nobody is bound to land here",
    )
    # What the unrouted queue may hold, on every transport: past either cap the oldest events in
    # it are dropped (logged, counted; docs/operations.md, the unrouted queue's cap).
    unrouted_max_events: int = Field(default=100_000, ge=1)
    unrouted_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    reconnect_interval_s: float = Field(default=0.5, gt=0)

    # Ingress
    http_host: str = "0.0.0.0"  # noqa: S104 - an ingress is meant to be reachable
    http_port: int = Field(default=8080, ge=0, le=65535)
    # One ingress process saturates one core; more share the listening socket (prefork).
    ingress_processes: int = Field(default=1, ge=1, le=64)
    http_path: str = "/b24/events"
    app_tokens: Annotated[tuple[str, ...], NoDecode] = ()
    allow_unverified: bool = False
    # At most 8 MiB: a message is at most about twice its body, and must stay within RabbitMQ's
    # max_message_size (16 MiB on 4.x). On Kafka a record must also fit the topic's
    # max.message.bytes (the broker's message.max.bytes, about 1 MB by default): the default
    # 1 MiB body plus headers does not; raise the topics' limit or lower this
    # (docs/transports/kafka.md).
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=8 * 1024 * 1024)
    publish_timeout_s: float = Field(
        default=0.75,
        gt=0,
        le=30,
        description="whole budget for a confirmed publish, retries included; then 503",
    )
    retry_after_s: int = Field(default=5, ge=1)
    spool_enabled: bool = Field(
        default=True,
        description="keep events on local disk while the queue cannot take them",
    )
    spool_path: str = ".b24queue/spool.sqlite3"
    spool_max_events: int = Field(default=100_000, ge=1)
    spool_bypass_s: float = Field(default=5.0, ge=0)
    # One tenant's share (b24queue/ingress/app.py): each verified portal (its member_id; a static
    # token: the token) may send `ingress_rate_per_s` events a second after a burst of
    # `ingress_rate_burst`; past it, 429. `auto`: on with per-portal verification, where anyone
    # gets a token by installing the app; off with static tokens only (the operator's portals).
    # Per process: each of B24QUEUE_INGRESS_PROCESSES refills at its share of the rate, and holds
    # a whole burst (one portal's burst may reach a single process).
    ingress_rate_limit: Literal["auto", "on", "off"] = "auto"
    ingress_rate_per_s: float = Field(default=50.0, gt=0, le=1_000_000)
    ingress_rate_burst: int = Field(default=1000, ge=1, le=1_000_000)

    # Per-portal tokens (a Bitrix24 app on many portals)
    portal_verification: bool = False
    portal_store: str = "sqlite:.b24queue/portals.sqlite3"
    portal_callback: bool = True
    app_client_id: str = ""
    portal_domains: Annotated[tuple[str, ...], NoDecode] = DEFAULT_PORTAL_DOMAINS
    portal_check_timeout_s: float = Field(default=3.0, gt=0, le=30)
    # Anyone can post an ONAPPINSTALL, and each costs an outbound call: bounded, refused at once
    # when over (see b24queue/auth/install.py).
    portal_check_concurrency: int = Field(default=8, ge=1, le=256)
    portal_check_per_domain_per_min: int = Field(default=4, ge=1, le=600)
    portal_check_per_s: float = Field(default=10.0, gt=0, le=1000)
    portal_allow_private: bool = False
    portal_ca_file: str = ""

    # Calling portals back (b24queue.portal). OAuth refresh needs the app's client id and secret;
    # the OAuth server's token URL is a setting so tests can point it at a fake.
    app_client_secret: SecretStr = SecretStr("")
    oauth_url: str = "https://oauth.bitrix.info/oauth/token/"
    # Bitrix24's leaky bucket per portal: "standard" drains 2 requests/s with a burst of 50,
    # "enterprise" 5/s and 250; B24QUEUE_PORTAL_BURST / _DRAIN_PER_S override the plan's numbers.
    portal_plan: Literal["standard", "enterprise"] = "standard"
    portal_burst: int | None = Field(default=None, ge=1, le=10_000)
    portal_drain_per_s: float | None = Field(default=None, gt=0, le=10_000)
    # Longest a call waits for the bucket; past it the event is retried later instead.
    portal_max_wait_s: float = Field(default=20.0, ge=0, le=600)
    portal_call_timeout_s: float = Field(default=30.0, gt=0, le=600)
    # A portal's answer is decoded whole, on the event loop: its size is bounded in bytes, and
    # in JSON values (b24queue.outbound), which bound what it decodes into (at most about 200
    # bytes each). A full batch of 50 crm.deal.list pages (2,500 deals of 95 fields) is 8 MB
    # and 290,566 values; past a bound: PortalError ANSWER_TOO_LARGE. An offline batch can hold
    # B24QUEUE_OFFLINE_BATCH records of up to B24QUEUE_MAX_BODY_BYTES each, more than any cap:
    # the puller then asks for fewer records.
    portal_max_answer_bytes: int = Field(
        default=16 * 1024 * 1024, ge=64 * 1024, le=32 * 1024 * 1024
    )
    portal_max_answer_values: int = Field(default=1_000_000, ge=10_000, le=10_000_000)
    # The memory of the portal answers a worker process reads and decodes at once: an answer
    # that would take it past this fails with PortalRetry ANSWERS_BUSY (the event is retried
    # later). At least one answer of the largest size the two bounds allow.
    portal_answers_budget_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024 * 1024, le=16 * 1024 * 1024 * 1024
    )
    # Inbound webhooks (https://<portal>/rest/<user>/<code>/), comma-separated: events from a
    # webhook's portal without OAuth credentials call through it.
    portal_webhooks: SecretStr = SecretStr("")

    # Offline events (b24queue.offline): `b24queue offline` pulls each portal's offline queue
    # (event.offline.get) into the exchange. Which portals ("*": every installed one, or
    # member_ids, comma-separated), the source key its bindings use (the app's own writes made
    # with it stay out of its queue), records per get, how often each portal is polled when no
    # ONOFFLINEEVENT wakes it, and the queue those pings reach the pullers through.
    offline_portals: Annotated[tuple[str, ...], NoDecode] = ("*",)
    offline_auth_connector: str = Field(default="b24queue", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    offline_batch: int = Field(default=50, ge=1, le=1000)
    offline_poll_s: float = Field(default=60.0, gt=0, le=86_400)
    offline_wake_queue: str = Field(default="b24queue.offline-wake", pattern=_NAME_PATTERN)
    offline_metrics_port: int = Field(default=0, ge=0, le=65535)
    # Events each puller binds (event_type=offline) on every portal it pulls, when it starts
    # pulling it and every hour after; and the ingress URL ONOFFLINEEVENT is bound to. Empty:
    # bind with `portals bind-offline`.
    offline_events: Annotated[tuple[str, ...], NoDecode] = ()
    offline_ping_url: str = Field(default="", pattern=r"^(https://\S{1,2000})?$")
    # The ping binding's `minTimeout` (event.bind options): Bitrix24 then pings at most once per
    # that many seconds, grouping records. Unset: not sent (Bitrix24's default, 1 s). A binding
    # already there keeps the value it was made with (unbind it to change it).
    offline_ping_min_timeout_s: int | None = Field(default=None, ge=0, le=3600)
    # A puller's hold on the batch it publishes, renewed while it works on it: others' recovery
    # leaves the batch alone until it runs out (a crashed puller's batch waits that long).
    offline_lease_s: float = Field(default=30.0, ge=1, le=3600)

    # Online event bindings (b24queue.offline.bindings): the app's public handler URL (the ingress,
    # as Bitrix24 reaches it), the events to bind beside those of B24QUEUE_EVENTS_CONSUMERS (every
    # consumer the app runs, MODULE:CLASS, comma-separated: the whole app's, never one worker's),
    # and the queue ONAPPINSTALL/ONAPPUPDATE reach the reconciler through. Empty URL: off.
    events_handler_url: str = ""
    events_bind: Annotated[tuple[str, ...], NoDecode] = ()
    events_consumers: Annotated[tuple[str, ...], NoDecode] = ()
    events_bindings_queue: str = Field(default="b24queue.bindings", pattern=_NAME_PATTERN)
    # The app's robots and workflow activities (b24queue.bizproc, docs/robots.md): MODULE:NAME,
    # comma-separated, each a Robot, an Activity, a RobotConsumer or a list of them. The ingress
    # routes their calls by these; the bindings reconciler registers them on every portal.
    bizproc: Annotated[tuple[str, ...], NoDecode] = ()

    # Workers
    shutdown_timeout_s: float = Field(default=30.0, ge=0)
    worker_metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Prometheus /metrics of a worker; 0 = off"
    )
    worker_metrics_host: str = "127.0.0.1"

    # `b24queue send`: the application token it sends (else --token-file, else the first of
    # B24QUEUE_APP_TOKENS); in the environment rather than --token, which other users see in ps.
    send_token: SecretStr = SecretStr("")

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator(
        "app_tokens",
        "portal_domains",
        "offline_portals",
        "offline_events",
        "events_bind",
        "events_consumers",
        "bizproc",
        mode="before",
    )
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        return registry.check_broker_url(value)

    @property
    def transport(self) -> str:
        """The name of the transport the broker URL's scheme picks: `amqp`, `sqlite`,
        `postgres`, `redis` or `kafka`."""
        return registry.descriptor_of(self.broker_url).name

    @field_validator("portal_store")
    @classmethod
    def _check_portal_store(cls, value: str) -> str:
        if not value.startswith(("sqlite:", *REDIS_URL_PREFIXES)):
            # Not echoed: a Redis URL holds its password.
            raise ValueError("must look like sqlite:PATH or redis://[:password@]host:6379/0")
        return value

    @field_validator("oauth_url")
    @classmethod
    def _check_oauth_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname or parts.query or "@" in parts.netloc:
            raise ValueError("must look like https://oauth.bitrix.info/oauth/token/")
        return value

    @field_validator("events_handler_url")
    @classmethod
    def _check_handler_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if (
            parts.scheme != "https"
            or not parts.hostname
            or "@" in parts.netloc
            or parts.fragment
            or len(value) > 1000
            or any(ch.isspace() for ch in value)
        ):
            raise ValueError(
                "must be the app's public https:// handler URL (no user, no fragment, at most "
                "1000 characters), e.g. https://app.example.com/b24/events"
            )
        return value

    @property
    def ingress_rate_limited(self) -> bool:
        """Whether the ingress limits each portal (B24QUEUE_INGRESS_RATE_LIMIT, `auto` resolved)."""
        if self.ingress_rate_limit == "auto":
            return self.portal_verification
        return self.ingress_rate_limit == "on"

    @property
    def portal_limits(self) -> tuple[int, float]:
        """The portal's leaky bucket: (burst, drain per second)."""
        burst, drain = (250, 5.0) if self.portal_plan == "enterprise" else (50, 2.0)
        return self.portal_burst or burst, self.portal_drain_per_s or drain

    @field_validator("http_path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value

    @model_validator(mode="after")
    def _answers_budget_holds_an_answer(self) -> Settings:
        largest = self.portal_answer_bounds.decoded_bytes()
        if self.portal_answers_budget_bytes < largest:
            raise ValueError(
                f"B24QUEUE_PORTAL_ANSWERS_BUDGET_BYTES ({self.portal_answers_budget_bytes}) must "
                f"hold at least one answer of the largest size allowed, {largest} bytes "
                "(B24QUEUE_PORTAL_MAX_ANSWER_BYTES + B24QUEUE_PORTAL_MAX_ANSWER_VALUES x "
                f"{VALUE_BYTES})"
            )
        return self

    @model_validator(mode="after")
    def _portal_callback_needs_client_id(self) -> Settings:
        if self.portal_verification and self.portal_callback and not self.app_client_id:
            raise ValueError(
                "B24QUEUE_PORTAL_VERIFICATION with the install call-back needs "
                "B24QUEUE_APP_CLIENT_ID (your app's client_id / code)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_env(cls, data: Any) -> Any:
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields}
        unknown = sorted(
            k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known
        )
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return data

    @property
    def portal_answer_bounds(self) -> Bounds:
        """How large one portal answer may be (b24queue.outbound)."""
        return Bounds(
            self.portal_max_answer_bytes,
            self.portal_max_answer_values,
            "B24QUEUE_PORTAL_MAX_ANSWER_BYTES",
            "B24QUEUE_PORTAL_MAX_ANSWER_VALUES",
        )

    def redacted_broker_url(self) -> str:
        """The queue's URL (every node's) for a log line or an error, never a password."""
        return redact_url(registry.descriptor_of(self.broker_url).server_url(self))

    def secrets(self) -> tuple[str, ...]:
        """Every secret value these settings hold, for `b24queue.secrets.redaction.remember`:
        tokens, the client secret, webhook codes, the passwords of the URLs. RabbitMQ's default
        password `guest` is no secret (and is its user name too: hiding it would hide that
        everywhere)."""
        values = [*self.app_tokens, self.app_client_secret.get_secret_value()]
        values.append(self.send_token.get_secret_value())
        for webhook in self.portal_webhooks.get_secret_value().split(","):
            url, _, app_token = webhook.strip().partition("#")
            values += [app_token, *(m.group(2) for m in WEBHOOK_PATH.finditer(url))]
        urls = [self.broker_url, self.portal_store, self.offline_ping_url, self.events_handler_url]
        urls += [getattr(self, name) for d in registry.DESCRIPTORS for name in d.secret_urls]
        for url in urls:
            values += url_secrets(url)
        return tuple(v for v in values if v and v != "guest")


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment plus explicit overrides (CLI flags win).

    Raises `ConfigError` with one line per bad field, naming its environment variable.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"])
        name = ENV_PREFIX + loc.upper() if loc else "settings"
        lines.append(f"{name}: {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
