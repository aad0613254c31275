from __future__ import annotations

import pytest
from yarl import URL

from b24queue.errors import ConfigError
from b24queue.settings import load_settings


def test_defaults() -> None:
    s = load_settings()
    assert s.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert s.exchange == "b24.events"
    assert s.unrouted == "b24.unrouted"
    assert s.management_url == "http://localhost:15672"
    assert (s.http_host, s.http_port) == ("0.0.0.0", 8080)
    assert s.app_tokens == ()
    assert s.queue_type == "quorum"
    assert s.max_body_bytes == 1024 * 1024


def test_env_is_read_and_tokens_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("B24QUEUE_APP_TOKENS", " one, two ,,three")
    monkeypatch.setenv("B24QUEUE_HTTP_PORT", "9000")
    monkeypatch.setenv("B24QUEUE_QUEUE_TYPE", "classic")
    s = load_settings()
    assert s.app_tokens == ("one", "two", "three")
    assert s.http_port == 9000
    assert s.queue_type == "classic"


def test_flags_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("B24QUEUE_HTTP_PORT", "9000")
    assert load_settings(http_port=9100).http_port == 9100


def test_unknown_env_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("B24QUEUE_APP_TOKEN", "typo")
    with pytest.raises(ConfigError, match=r"unknown setting.*B24QUEUE_APP_TOKEN"):
        load_settings()


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("B24QUEUE_HTTP_PORT", "eighty", "B24QUEUE_HTTP_PORT: Input should be a valid integer"),
        ("B24QUEUE_HTTP_PORT", "70000", "B24QUEUE_HTTP_PORT: Input should be less than"),
        ("B24QUEUE_AMQP_URL", "http://x", "B24QUEUE_AMQP_URL: Value error, must look like amqp"),
        ("B24QUEUE_QUEUE_TYPE", "stream", "B24QUEUE_QUEUE_TYPE: Input should be 'quorum'"),
        ("B24QUEUE_EXCHANGE", "has space", "B24QUEUE_EXCHANGE: String should match pattern"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, words: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert words in str(info.value)


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(Exception, match="frozen"):
        s.http_port = 1  # type: ignore[misc]


def test_redacted_url_hides_the_password() -> None:
    s = load_settings(amqp_url="amqp://app:s3cret@broker:5673/prod")
    assert "s3cret" not in s.redacted_broker_url()
    assert s.vhost == "prod"
    assert s.broker_credentials == ("app", "s3cret")


@pytest.mark.parametrize(
    ("url", "credentials"),
    [
        ("amqp://user:p%40ss@host/", ("user", "p@ss")),
        ("amqp://us%40er%3A1:a%2Fb%3Ac%25d%20e@host:5672/vh", ("us@er:1", "a/b:c%d e")),
        ("amqp://user:pa+ss@host/", ("user", "pa+ss")),  # userinfo has no "+ is a space"
        ("amqp://host/", ("guest", "guest")),
        ("amqp://user@host/", ("user", "guest")),
    ],
)
def test_broker_credentials_are_percent_decoded_as_aio_pika_does(
    url: str, credentials: tuple[str, str]
) -> None:
    """The management API must get the same user and password as the AMQP login."""
    assert load_settings(amqp_url=url).broker_credentials == credentials
    parsed = URL(url)  # what aio-pika (aiormq) logs in with
    assert (parsed.user or "guest", parsed.password or "guest") == credentials


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("amqp://app:s%40cret@broker/prod", "amqp://app:***@broker/prod"),
        ("amqps://app:p@ss@broker/", "amqps://app:***@broker/"),
        ("amqp://app:secret@[::1]:5673/", "amqp://app:***@[::1]:5673/"),
    ],
)
def test_redacted_url_keeps_user_host_and_port(url: str, redacted: str) -> None:
    assert load_settings(amqp_url=url).redacted_broker_url() == redacted


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://h/", "/"),
        ("amqp://h", "/"),
        ("amqp://h/%2F", "/"),
        ("amqp://h/prod", "prod"),
        ("amqp://h/a%2Fb", "a/b"),
    ],
)
def test_the_vhost_is_percent_decoded(url: str, vhost: str) -> None:
    assert load_settings(amqp_url=url).vhost == vhost
