"""Asking Bitrix24's OAuth server for a new token pair with a refresh token (one HTTP request,
its answer checked, read as b24queue.outbound reads every answer). No state here:
b24queue.portal.oauth decides when to ask and keeps what comes back."""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from b24queue.auth.record import Grant, PortalRecord
from b24queue.outbound.answers import (
    AnswerTooLarge,
    Bounds,
    NotJSON,
    Redirected,
    check_redirect,
    decode_json,
    read_bounded,
)
from b24queue.portal.api import PortalError
from b24queue.secrets.redaction import redact
from b24queue.settings import Settings

OAUTH_TIMEOUT_S = 10.0
# The longest an OAuth token is believed to live, whatever the server says (Bitrix24's: 1 hour).
MAX_LIFETIME_S = 2 * 3600
# Bitrix24's answer is a dozen values in a few hundred bytes. With at most OAUTH_CONNECTIONS
# (b24queue.portal.clients) read at once, no budget of their own beyond that.
BOUNDS = Bounds(max_bytes=64 * 1024, max_values=10_000)
_TOKEN = re.compile(r"[\x21-\x7e]{1,256}")


async def ask_oauth(
    session: aiohttp.ClientSession, settings: Settings, record: PortalRecord, now: float
) -> Grant:
    """What the OAuth server grants for the portal's stored refresh token."""
    s = settings
    secret = s.app_client_secret.get_secret_value()
    if not s.app_client_id or not secret:
        raise PortalError(
            "expired_token",
            "the portal's access token has expired; refreshing it needs "
            "B24QUEUE_APP_CLIENT_ID and B24QUEUE_APP_CLIENT_SECRET",
        )
    params = {
        "grant_type": "refresh_token",
        "client_id": s.app_client_id,
        "client_secret": secret,
        "refresh_token": record.refresh_token,
    }
    status = 0
    try:
        async with session.get(
            s.oauth_url,
            params=params,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=OAUTH_TIMEOUT_S),
        ) as resp:
            status = resp.status
            check_redirect(status, resp.headers.get("Location"))
            body = await read_bounded(resp.content, BOUNDS)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        # Never str(exc): aiohttp's errors name the URL, and this one holds the secrets.
        raise PortalError("OAUTH_UNREACHABLE", type(exc).__name__) from None
    except Redirected as exc:
        raise PortalError("OAUTH_REDIRECT", f"the OAuth server {exc}", status=status) from None
    except AnswerTooLarge as exc:
        raise PortalError("BAD_ANSWER", f"the OAuth server: {exc}", status=status) from None
    return _tokens(record, status, body, now, sent=(secret,))


def _tokens(
    record: PortalRecord, status: int, body: bytes, now: float, sent: tuple[str, ...] = ()
) -> Grant:
    """The answer's tokens; `PortalError` with its error, less what the request `sent` (the
    client secret) and the portal's tokens: a server may quote the request it refuses."""
    try:
        answer: Any = decode_json(body, BOUNDS)
    except AnswerTooLarge as exc:
        raise PortalError("BAD_ANSWER", f"the OAuth server: {exc}", status=status) from None
    except NotJSON:
        answer = None
    if not isinstance(answer, dict):
        raise PortalError("BAD_ANSWER", f"the OAuth server's answer (HTTP {status}) is not JSON")
    if status != 200 or "error" in answer:
        ours = (*sent, record.refresh_token, record.access_token)
        error = redact(str(answer.get("error") or status), ours)
        said = redact(str(answer.get("error_description") or ""), ours)
        raise PortalError(error, said, status=status)
    access, refresh = answer.get("access_token"), answer.get("refresh_token")
    if not all(isinstance(t, str) and _TOKEN.fullmatch(t) for t in (access, refresh)):
        raise PortalError("BAD_ANSWER", "the OAuth server's answer has no usable tokens")
    member = answer.get("member_id")
    if member is not None and str(member) != record.member_id:
        raise PortalError("WRONG_PORTAL", "the OAuth server answered for another portal")
    lifetime = answer.get("expires_in")
    if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = 3600
    assert isinstance(access, str) and isinstance(refresh, str)
    return Grant(access, int(now) + min(lifetime, MAX_LIFETIME_S), refresh)
