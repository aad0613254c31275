from __future__ import annotations

import logging

import pytest

from b24queue.auth.tokens import AcceptAll, StaticTokens, verifier_from_settings
from b24queue.errors import ConfigError, UnauthorizedError
from b24queue.events import Event
from b24queue.settings import load_settings


def event(token: str | None) -> Event:
    auth = {"domain": "a.bitrix24.com"} | ({"application_token": token} if token else {})
    return Event.from_payload({"event": "ONX", "auth": auth})


async def test_static_tokens_accept_any_configured_token() -> None:
    verifier = StaticTokens(("t1", "t2"))
    # The tenant (the key of its rate limit) is the token proven, by its place, never the token.
    assert await verifier.verify(event("t1")) == "token#1"
    assert await verifier.verify(event("t2")) == "token#2"


async def test_unverified_events_are_whoever_they_claim_to_be() -> None:
    claims = {"domain": "a.bitrix24.com", "member_id": "m1"}
    assert await AcceptAll().verify(Event.from_payload({"event": "ONX", "auth": claims})) == "m1"
    assert await AcceptAll().verify(event(None)) == "domain:a.bitrix24.com"
    assert await AcceptAll().verify(Event.from_payload({"event": "ONX"})) == "-"


@pytest.mark.parametrize("token", [None, "", "t", "t1x", "T1"])
async def test_static_tokens_refuse_others(token: str | None) -> None:
    with pytest.raises(UnauthorizedError, match=r"auth\[application_token\]") as info:
        await StaticTokens(("t1",)).verify(event(token))
    assert "t1" not in str(info.value).replace("auth[application_token]", "")


def test_no_token_configured_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="B24QUEUE_APP_TOKENS"):
        verifier_from_settings(load_settings())


def test_explicit_opt_out_is_loud(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        verifier = verifier_from_settings(load_settings(allow_unverified=True))
    assert isinstance(verifier, AcceptAll)
    assert "VERIFICATION IS OFF" in caplog.text


def test_tokens_win_over_opt_out() -> None:
    verifier = verifier_from_settings(load_settings(app_tokens="a", allow_unverified=True))
    assert isinstance(verifier, StaticTokens)
