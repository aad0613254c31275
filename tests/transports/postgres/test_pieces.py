"""The PostgreSQL transport's pieces that need no server. Routing in SQL uses `topic_regex`: it
must agree with `topic_matches`, the rule SQLite and RabbitMQ's topic exchange follow."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from b24queue.queues import topic_matches, topic_regex

WORDS = st.sampled_from(["A", "B", "ONCRMDEALADD", "x_1"])
KEYS = st.lists(WORDS, min_size=1, max_size=5).map(".".join)
PATTERNS = st.lists(st.one_of(WORDS, st.just("*"), st.just("#")), min_size=1, max_size=5).map(
    ".".join
)


@given(PATTERNS, KEYS)
def test_the_regex_matches_what_the_topic_rule_matches(pattern: str, key: str) -> None:
    assert bool(re.fullmatch(topic_regex(pattern), "." + key)) == topic_matches(pattern, key)


def test_known_cases() -> None:
    regex = topic_regex("CATALOG.#")
    assert re.fullmatch(regex, ".CATALOG") and re.fullmatch(regex, ".CATALOG.A.B")
    assert not re.fullmatch(regex, ".CATALOGX")
    assert re.fullmatch(topic_regex("*.B"), ".A.B") and not re.fullmatch(topic_regex("*.B"), ".B")


def test_a_missing_driver_is_a_clear_error() -> None:
    """`postgresql://` without asyncpg installed: one line naming the extra, not a traceback."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "from b24queue.settings import load_settings\n"
        "from b24queue.transports import transport_for\n"
        "from b24queue.errors import ConfigError\n"
        "try:\n"
        "    transport_for(load_settings(broker_url='postgresql://u@h/db'))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'b24queue[postgres]'" in out.stdout, out


def test_the_url_in_logs_never_holds_the_password() -> None:
    from b24queue.settings import load_settings

    for url, shown in (
        ("postgresql://app:s3cret@db:5432/q", "postgresql://app:***@db:5432/q"),
        (
            "postgresql://app:s3cret@h1:5432,h2:5433/q?sslmode=require",
            "postgresql://app:***@h1:5432,h2:5433/q?sslmode=require",
        ),
        (
            "postgres://db/q?sslmode=require&password=s3cret",
            "postgres://db/q?sslmode=require&password=***",
        ),
    ):
        assert load_settings(broker_url=url).redacted_broker_url() == shown


def test_a_schema_name_whose_notify_channel_would_not_fit_is_refused() -> None:
    import pytest

    from b24queue.errors import ConfigError
    from b24queue.settings import load_settings

    load_settings(broker_url="postgresql://db/q", postgres_schema="s" * 54)
    with pytest.raises(ConfigError, match="B24QUEUE_POSTGRES_SCHEMA"):
        load_settings(broker_url="postgresql://db/q", postgres_schema="s" * 55)
