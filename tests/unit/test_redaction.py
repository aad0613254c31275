"""b24queue.secrets.redaction (no secret in output) and b24queue.cli.terminal (no control
character from a message on the operator's terminal): the shapes of URL each setting takes, the
secrets settings hold, every log line, and the characters escaped. What reaches a dead letter or a
CLI print is tested end to end in tests/security/test_output.py."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from b24queue import Event, EventConsumer
from b24queue import _constants as c
from b24queue.cli.terminal import safe
from b24queue.errors import ConfigError
from b24queue.secrets import redaction
from b24queue.secrets.redaction import redact, redact_url, url_secrets
from b24queue.settings import load_settings
from b24queue.telemetry import logs
from b24queue.testing import make_event, run_handler


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    yield
    redaction.remember(())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://app:s3cret@n1:5672/v,amqp://app:s3cret@n2/v", "amqp://app:***@n1:5672/v,amqp://app:***@n2/v"),
        ("amqp://app:s3cret@n1,amqp://app:s3cret@n2", "amqp://app:***@n1,amqp://app:***@n2"),
        ("amqps://app:p@ss@broker/", "amqps://app:***@broker/"),  # a raw '@' in the password
        ("kafka://app:s3cret@k1:9092,k2", "kafka://app:***@k1:9092,k2"),
        ("redis://:s3cret@r1:6379/0", "redis://:***@r1:6379/0"),
        ("redis://user@r1/0", "redis://user@r1/0"),  # a user name alone is no secret
        ("postgres://db/q?sslmode=require&password=s3cret", "postgres://db/q?sslmode=require&password=***"),
        ("http://h/x?access_token=a1&client_secret=b2&id=3", "http://h/x?access_token=***&client_secret=***&id=3"),
        ("https://p.bitrix24.com/rest/1/abcd1234/#apptoken", "https://p.bitrix24.com/rest/1/***/#***"),
        ("sqlite:/var/lib/q.sqlite3", "sqlite:/var/lib/q.sqlite3"),
        ("http://127.0.0.1:8080/b24/events", "http://127.0.0.1:8080/b24/events"),
    ],
)  # fmt: skip
def test_a_url_is_shown_without_its_secrets(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact(url)


def test_the_secrets_of_a_url_are_found_as_written_and_decoded() -> None:
    assert set(url_secrets("amqp://app:p%40ss@h/,redis://:other@r/0?password=third")) == {
        "p%40ss",
        "p@ss",
        "other",
        "third",
    }


def test_settings_name_every_secret_they_hold() -> None:
    settings = load_settings(
        app_tokens="static-token-1,static-token-2",
        app_client_secret="client-secret-x",
        send_token="send-token-x",
        amqp_url="amqp://app:amqp-pass@h1/v",
        management_url="http://admin:mgmt-pass@h1:15672",
        portal_store="redis://:store-pass@cache:6379/0",
        portal_webhooks="https://a.bitrix24.com/rest/1/hookcode1/#paired-token",
        offline_ping_url="https://ingress.example/b24/events?key=ping-key-x",
    )
    assert set(settings.secrets()) >= {
        "static-token-1",
        "static-token-2",
        "client-secret-x",
        "send-token-x",
        "amqp-pass",
        "mgmt-pass",
        "store-pass",
        "hookcode1",
        "paired-token",
        "ping-key-x",
    }
    assert "guest" not in load_settings().secrets()  # RabbitMQ's default: no secret, a user name


def test_remembered_secrets_and_the_calls_own_are_hidden_in_any_text() -> None:
    redaction.remember(["client-secret-x", "abc"])  # too short to search for in free text
    text = "client-secret-x rejected; token tok-of-the-call; abc; see https://u:pw@h/"
    assert (
        redact(text, ("tok-of-the-call",)) == "*** rejected; token ***; abc; see https://u:***@h/"
    )


def test_every_log_line_is_redacted() -> None:
    redaction.remember(["client-secret-x"])
    stream = io.StringIO()
    handler = logs._TurnHandler(stream)
    handler.setFormatter(logs._TextFormatter())
    logger = logging.getLogger("b24queue.test-redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("a library said: %s", "client_id=x client_secret=client-secret-x")
        logger.warning("connecting to kafka://app:pw123@k1:9092")
    finally:
        logger.removeHandler(handler)
    assert "client-secret-x" not in stream.getvalue() and "pw123" not in stream.getvalue()
    assert "client_secret=***" in stream.getvalue() and "kafka://app:***@k1" in stream.getvalue()


class QuotesItsRequest(EventConsumer):
    queue = "quotes"
    events = ("#",)
    max_attempts = 1

    async def handle(self, event: Event) -> None:
        raise ValueError("POST failed: client-secret-x / static-token-1")


async def test_a_dead_letter_keeps_no_secret_of_the_settings() -> None:
    settings = load_settings(app_client_secret="client-secret-x", app_tokens="static-token-1")
    redaction.remember(settings.secrets())  # as the worker does
    outcome = await run_handler(QuotesItsRequest(), make_event("ONCRMDEALADD"))
    assert outcome.dead_lettered
    assert outcome.headers[c.H_ERROR_MESSAGE] == "POST failed: *** / ***"


def test_a_kafka_url_with_credentials_is_refused_without_echo() -> None:
    with pytest.raises(ConfigError, match="SASL") as caught:
        load_settings(broker_url="kafka://app:kafka-pass@k1:9092")
    assert "kafka-pass" not in str(caught.value)


def test_an_invalid_portal_store_is_refused_without_echo() -> None:
    with pytest.raises(ConfigError, match="B24QUEUE_PORTAL_STORE") as caught:
        load_settings(portal_store="rediss//:store-pass@cache:6379/0")
    assert "store-pass" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
        ("line\nforged\r\t", "line\\x0aforged\\x0d\\x09"),
        ("\x9b31m \x7f \x00", "\\x9b31m \\x7f \\x00"),
        ("\u202etxt.exe \u2066x\u2069 \u200f", "\\u202etxt.exe \\u2066x\\u2069 \\u200f"),
        ("Сделка №7 — café 🚀", "Сделка №7 — café 🚀"),  # letters and symbols stay as they are
    ],
)
def test_control_characters_are_escaped_for_the_terminal(text: str, shown: str) -> None:
    assert safe(text) == shown
