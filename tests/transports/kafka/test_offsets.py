"""The Kafka transport's pure parts: what a consumer may commit when handlers finish out of
order, what counts as redelivered, and the kafka:// URL."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from b24queue.errors import ConfigError
from b24queue.settings import load_settings
from b24queue.transports.kafka.client import REVOKE_WAIT_S, consumer
from b24queue.transports.kafka.offsets import Offsets

TP = TopicPartition("b24.events", 0)


def test_the_commit_point_never_passes_an_unfinished_record() -> None:
    offsets = Offsets()
    part = offsets.assign(TP, committed=10, handed=0)
    for offset in (10, 11, 12):
        part.take(offset)
    part.skip(13)  # not routed to this queue: settled as read
    part.settle(12)
    part.settle(11)
    assert offsets.to_commit() == {}  # 10 still runs: nothing may be committed past it
    part.settle(10)
    assert offsets.to_commit() == {TP: 14}
    offsets.committed({TP: 14})
    assert offsets.to_commit() == {}


def test_skipped_records_commit_while_nothing_is_open() -> None:
    offsets = Offsets()
    part = offsets.assign(TP, committed=0, handed=0)
    part.skip(0)
    part.skip(1)
    assert offsets.to_commit() == {TP: 2}
    part.take(2)
    part.skip(3)
    assert offsets.to_commit() == {TP: 2}


def test_a_settlement_after_a_revoke_changes_nothing() -> None:
    offsets = Offsets()
    old = offsets.assign(TP, committed=0, handed=0)
    old.take(0)
    offsets.revoke([TP])
    new = offsets.assign(TP, committed=0, handed=1)
    old.settle(0)
    assert not offsets.owns(old) and offsets.owns(new)
    assert offsets.to_commit() == {}
    assert new.redelivered(0) and not new.redelivered(1)


def test_the_handout_mark_covers_what_was_handed_out_once() -> None:
    """Bookkeeping only: that the mark is committed before the handlers run is the runner's
    (`_before_handlers`), exercised by the SIGKILL and rebalance tests on Tansu."""
    offsets = Offsets()
    part = offsets.assign(TP, committed=5, handed=3)  # an older mark below the commit: ignored
    assert not part.redelivered(5)
    part.take(5)
    part.take(6)
    assert offsets.to_mark() == {TP: 7}
    offsets.marked({TP: 7})
    assert offsets.to_mark() == {}


def test_kafka_urls() -> None:
    settings = load_settings(broker_url="kafka://k1:9093,k2")
    assert settings.transport == "kafka"
    assert settings.kafka_bootstrap == ["k1:9093", "k2:9092"]
    with pytest.raises(ConfigError):
        load_settings(broker_url="kafka://")


def test_the_broker_url_in_a_log_line() -> None:
    assert load_settings(broker_url="kafka://k1,k2:9093").redacted_broker_url() == (
        "kafka://k1,k2:9093"
    )
    redis = load_settings(broker_url="redis://:secret@r1:6379/0").redacted_broker_url()
    assert "secret" not in redis and "r1:6379" in redis


async def test_the_rebalance_timeout_outlasts_the_revoke_wait() -> None:
    """The group waits this long for a member to rejoin; a member still waiting for its
    handlers (REVOKE_WAIT_S) and committing must not be dropped meanwhile (aiokafka would
    default it to the session timeout, 10 s: no longer than the wait)."""
    settings = load_settings(broker_url="kafka://k1")
    kafka = consumer(settings, "worker", "group")
    try:
        assert kafka._rebalance_timeout_ms >= (REVOKE_WAIT_S + 20) * 1000
        assert kafka._rebalance_timeout_ms >= 60_000
    finally:
        await kafka.stop()  # never started: closes its client


def test_records_settled_above_the_commit_point_are_noted_and_passed_over_later() -> None:
    offsets = Offsets()
    part = offsets.assign(TP, committed=0, handed=0)
    for offset in (0, 1, 2):
        part.take(offset)
    part.settle(1)
    part.settle(2)
    [(noted, done)] = offsets.to_note().items()
    assert noted is part and done == {1, 2}
    part.noted = done
    assert offsets.to_note() == {}  # unchanged: not written again
    # A later owner: 0 still open, 1 and 2 (and 7, not read yet) settled by the earlier one.
    later = Offsets().assign(TP, committed=0, handed=3, prior={1, 2, 7})
    assert later.prior == {1, 2, 7}
    later.take(0)
    later.pass_settled(1)
    later.pass_settled(2)
    assert later.commit_point == 0 and later.to_note() == {1, 2}
    later.settle(0)
    assert later.commit_point == 3 and later.to_note() is None  # nothing above it now
