"""What no output of b24queue shows: its own secrets. Standard library only (every layer uses it).

`redact_url`: a URL (or several, comma-separated) fit for a log line, an error or a CLI print:
the password of its user info, the values of its secret-looking query parameters, its fragment
and the code of a Bitrix24 webhook (`/rest/<user>/<code>/`) hidden.

`redact`: any text we keep or show (the error kept in a dead letter's headers, a spool's
quarantine reason, every log line): the secrets this process runs with (`remember`: its
settings' tokens, client secret, webhook codes and URL passwords), the current call's own
(`extra`: an event's tokens, the credentials a request sent), and the passwords and webhook
codes of the URLs in it, hidden. Values are matched as they are: a secret another program
quoted in another form (percent-encoded, JSON-escaped) is hidden only where it is in a URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote

HIDDEN = "***"
# A known value shorter than this is not searched for in free text: it would hide ordinary words
# (a URL's password is hidden in the URL whatever its length).
MIN_SECRET_CHARS = 4

# scheme://user:password@ - the user info runs to the last '@' before the path, so a password
# with a raw '@' in it is hidden whole; several hosts after it (kafka://u:p@h1,h2) are kept.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^\s/?#]*)@")
# ?password=…, &access_token=…, sslpassword, client_secret, api_key, sig…
_SECRET_PARAM = re.compile(
    r"(?P<head>[?&](?P<name>[^=&#\s]*(?:pass|pwd|secret|token|auth|key|sig|credential)"
    r"[^=&#\s]*)=)(?P<value>[^&#\s]*)",
    re.IGNORECASE,
)
_FRAGMENT = re.compile(r"#[^,\s]*")
# The code of an inbound webhook, https://<portal>/rest/<user id>/<code>/: a password.
WEBHOOK_PATH = re.compile(r"/rest/([0-9]{1,12})/([A-Za-z0-9]{4,128})/?")
_WEBHOOK_CODE = re.compile(r"(/rest/[0-9]{1,12}/)[A-Za-z0-9]{4,128}(?![A-Za-z0-9.])")

_known: tuple[str, ...] = ()


def remember(secrets: Iterable[str]) -> None:
    """The secrets of the settings this process runs with (replacing any remembered before):
    `redact` hides them wherever they appear."""
    global _known
    _known = _longest_first(secrets)


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with every remembered secret, every value of `extra`, and the passwords and
    webhook codes of the URLs in it replaced by `***`."""
    secrets = _longest_first((*_known, *extra)) if extra else _known
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, HIDDEN)
    return _hide_in_urls(text)


def redact_url(url: str) -> str:
    """A URL (or several, comma-separated) for output: user names and hosts kept, passwords,
    secret query values, fragments and webhook codes replaced by `***`."""
    return _FRAGMENT.sub("#" + HIDDEN, _hide_in_urls(url))


def url_secrets(url: str) -> list[str]:
    """The secret values of a URL (or several, comma-separated): the password of its user info
    and its secret-looking query values, as written and percent-decoded."""
    found: list[str] = []
    for match in _USERINFO.finditer(url):
        _user, colon, password = match.group("info").partition(":")
        if colon:
            found += [password, unquote(password)]
    for match in _SECRET_PARAM.finditer(url):
        found += [match.group("value"), *(v for _, v in parse_qsl(match.group(0)[1:]))]
    for match in WEBHOOK_PATH.finditer(url):
        found.append(match.group(2))
    return [value for value in found if value]


def _hide_in_urls(text: str) -> str:
    if "://" in text:
        text = _USERINFO.sub(_hide_password, text)
    if "=" in text and ("?" in text or "&" in text):
        text = _SECRET_PARAM.sub(lambda m: m.group("head") + HIDDEN, text)
    if "/rest/" in text:
        text = _WEBHOOK_CODE.sub(lambda m: m.group(1) + HIDDEN, text)
    return text


def _hide_password(match: re.Match[str]) -> str:
    user, colon, _password = match.group("info").partition(":")
    return f"{match.group('scheme')}{user}{colon}{HIDDEN if colon else ''}@"


def _longest_first(values: Iterable[str]) -> tuple[str, ...]:
    # Longest first: a secret that holds another is hidden whole, not around the shorter one.
    unique = {v for v in values if len(v) >= MIN_SECRET_CHARS}
    return tuple(sorted(unique, key=len, reverse=True))
