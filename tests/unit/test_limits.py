"""The token buckets (b24queue.limits) on a clock the test moves by hand: no sleeps. The per-portal
limit of the ingress is seen through HTTP in tests/security/test_rate_limit.py."""

from __future__ import annotations

from b24queue.ingress.prefork import child_env
from b24queue.limits import KeyedLimiter, TokenBucket
from b24queue.settings import load_settings
from tests.support.clock import Clock


def test_a_bucket_says_how_long_until_its_next_token() -> None:
    bucket = TokenBucket(2, 0.5, now=0.0)
    assert bucket.wait_s(0.0) == 0.0
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.0)
    assert bucket.wait_s(0.0) == 2.0
    assert bucket.wait_s(1.5) == 0.5
    assert not bucket.take(1.5)
    assert bucket.take(2.0)
    assert bucket.full_at() == 6.0  # two tokens short, half a token a second


def test_a_burst_then_the_sustained_rate() -> None:
    clock = Clock()
    limiter = KeyedLimiter(capacity=5, per_s=2, max_keys=10, clock=clock)
    assert [limiter.take("p") for _ in range(6)] == [True] * 5 + [False]
    assert limiter.wait_s("p") == 0.5
    admitted = 0
    for _ in range(80):  # ten seconds, eight tries a second: twenty get through
        clock.now += 0.125
        admitted += limiter.take("p")
    assert admitted == 20
    assert limiter.wait_s("unknown") == 0.0


def test_keys_never_spend_each_others_budget() -> None:
    clock = Clock()
    limiter = KeyedLimiter(capacity=3, per_s=0.01, max_keys=10, clock=clock)
    assert all(limiter.take("alpha") for _ in range(3))
    assert not limiter.take("alpha")
    assert all(limiter.take("beta") for _ in range(3))


def test_refilled_buckets_are_forgotten_and_drained_ones_are_kept() -> None:
    clock = Clock()
    limiter = KeyedLimiter(capacity=10, per_s=1, max_keys=1000, clock=clock)
    for _ in range(10):
        limiter.take("drained")
    for i in range(100):
        limiter.take(f"p{i}")  # one token each: full again a second later
    assert len(limiter) == 101
    clock.now += 2
    # At most two forgotten a call (O(1)), least recently used first: the drained bucket is first
    # and not full yet (eight seconds to go), so nothing behind it goes before it does.
    limiter.take("p0")
    assert len(limiter) == 101
    clock.now += 8
    for _ in range(60):
        before = len(limiter)
        limiter.take("p0")
        assert before - len(limiter) <= 2
    assert len(limiter) == 1  # only "p0" is left: idle full buckets are gone
    assert limiter.take("drained")  # forgotten once full: a new bucket is the same thing


def test_a_full_table_forgets_the_least_recently_used_early() -> None:
    clock = Clock()
    limiter = KeyedLimiter(capacity=2, per_s=0.001, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        limiter.take(key)
        limiter.take(key)
    assert not limiter.take("a")  # "a" is now the most recent; "b" the least
    assert limiter.take("d")
    assert len(limiter) == 3
    assert limiter.take("b")  # forgotten while drained: its bucket refilled early
    assert len(limiter) == 3
    assert not limiter.take("a")  # the most recent ones are kept, drained


def test_the_limit_is_on_by_default_only_with_per_portal_verification() -> None:
    assert not load_settings(app_tokens="t").ingress_rate_limited
    marketplace = load_settings(portal_verification=True, portal_callback=False)
    assert marketplace.ingress_rate_limited
    assert (marketplace.ingress_rate_per_s, marketplace.ingress_rate_burst) == (50.0, 1000)
    assert load_settings(app_tokens="t", ingress_rate_limit="on").ingress_rate_limited
    off = load_settings(portal_verification=True, portal_callback=False, ingress_rate_limit="off")
    assert not off.ingress_rate_limited


def test_each_ingress_process_knows_how_many_they_are() -> None:
    # `--processes 3` is a flag, not in the environment: the children must still learn it, or
    # each would take the whole rate instead of its share.
    env = child_env(load_settings(app_tokens="t", ingress_processes=3), "/tmp/metrics")
    assert env["B24QUEUE_INGRESS_PROCESSES"] == "3"
