from __future__ import annotations

import pytest

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
    assert "s3cret" not in s.redacted_amqp_url()
    assert s.vhost == "prod"
    assert s.broker_credentials == ("app", "s3cret")
