"""Findings 1 and 5: every field that reaches a header or the routing key is checked at the edge,
and no input gives a 500: each is a 400 naming the field, and nothing is published."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, unquote

import pytest
from aiohttp.test_utils import TestClient

from tests.support.samples import FORM, SAMPLE_TOKEN, sample_decoded, sample_form
from tests.support.sinks import MemorySink

JSON = {"Content-Type": "application/json"}


def form_with(**replace: str) -> bytes:
    """The crm-deal-add sample with some fields replaced (bracket names, raw values)."""
    body = sample_form("crm-deal-add").decode()
    pairs = []
    for pair in body.split("&"):
        key = pair.split("=", 1)[0]
        name = unquote(key)
        if name in replace:
            pairs.append(f"{key}={quote(replace.pop(name))}")
        else:
            pairs.append(pair)
    pairs += [f"{quote(k)}={quote(v)}" for k, v in replace.items()]
    return "&".join(pairs).encode()


async def refused_400(client: TestClient[Any, Any], sink: MemorySink, **kw: Any) -> dict[str, Any]:
    resp = await client.post("/b24/events", **kw)
    text = await resp.text()
    assert resp.status == 400, text
    assert "Traceback" not in text
    assert sink.published == []
    body: dict[str, Any] = json.loads(text)
    return body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("auth[domain]", "a" * 200_000),  # the review's: FRAME_ERROR, then a jammed spool
        ("auth[domain]", "acme.bitrix24.com\r\nx-forged: 1"),
        ("auth[domain]", "a" * 254),
        ("auth[domain]", "bad_host..com"),
        ("auth[member_id]", "m" * 65),
        ("auth[member_id]", "5f2a9c3e-1b7d"),
        ("auth[member_id]", "x" * 100_000),
        ("event_handler_id", "12a"),
        ("event_handler_id", "1" * 21),
        ("event", "ONCRMDEALADD\n"),  # `$` would have let the newline through
        ("event", "A" * 129),
        ("event", "ONCRMDEAL ADD"),
        ("event", "CATALOG..PRODUCT"),
        ("event", "CATALOG.*"),
        ("auth[application_token]", "t" * 300),
        ("auth[expires_in]", "9" * 3000),
    ],
)
async def test_a_bad_header_or_routing_field_is_a_400_naming_it(
    client: TestClient[Any, Any], sink: MemorySink, field: str, value: str
) -> None:
    body = await refused_400(client, sink, data=form_with(**{field: value}), headers=FORM)
    assert body["field"] == field, body
    assert len(body["error"]) < 400  # the value itself is never echoed back in full


@pytest.mark.parametrize(
    "body",
    [
        b'{"event": "ONCRMDEALADD", "ts": ' + b"1" * 4301 + b"}",
        b'{"event": "ONCRMDEALADD", "data": {"ID": ' + b"9" * 5000 + b"}}",
        b'{"event": "ONCRMDEALADD", "data": {"X": NaN}}',
        b'{"event": "ONCRMDEALADD", "data": {"X": Infinity}}',
        b'{"event": "ONCRMDEALADD", "data": {"X": -Infinity}}',
        b'{"event": "ONCRMDEALADD", "data": {"X": "\\ud800"}}',
        b'{"event": "ONCRMDEALADD", "data": {"\\udfff": "x"}}',
        b'{"event": "ONCRMDEALADD", "auth": {"member_id": "\\ud800"}}',
        b'{"event": "ONCRMDEALADD", "auth": {"application_token": "\\ud800abc"}}',
        b'{"name": "ONCRMDEALADD"}',
        b'{"event": "ONCRMDEALADD", "data": {"x": 1e400, "y": -1e999}}',  # parse to infinities
        b'{"event": "ONCRMDEALADD\\n"}',
    ],
)
async def test_json_that_used_to_give_500_or_odd_json_is_a_400(
    client: TestClient[Any, Any], sink: MemorySink, body: bytes
) -> None:
    if b'"auth"' not in body:  # a valid token: what is refused is the body, not the caller
        body = body[:-1] + b', "auth": {"application_token": "%s"}}' % SAMPLE_TOKEN.encode()
    await refused_400(client, sink, data=body, headers=JSON)


async def test_name_is_not_another_spelling_of_event(
    client: TestClient[Any, Any], sink: MemorySink
) -> None:
    form = sample_form("crm-deal-add").replace(b"event=", b"name=", 1)
    body = await refused_400(client, sink, data=form, headers=FORM)
    assert body["field"] == "event"


async def test_a_trailing_newline_in_the_event_name_is_refused(
    client: TestClient[Any, Any], sink: MemorySink
) -> None:
    form = sample_form("crm-deal-add").replace(b"event=ONCRMDEALADD", b"event=ONCRMDEALADD%0A")
    body = await refused_400(client, sink, data=form, headers=FORM)
    assert body["field"] == "event"


async def test_integer_auth_fields_in_json_are_accepted_as_their_decimal_strings(
    client: TestClient[Any, Any], sink: MemorySink
) -> None:
    event = sample_decoded("crm-deal-add")
    event["auth"].update({"expires": 1764370800, "expires_in": 3600, "user_id": 1})
    event["event_handler_id"], event["ts"] = 41, 1764367200
    resp = await client.post("/b24/events", data=json.dumps(event), headers=JSON)
    assert resp.status == 200, await resp.text()
    [published] = sink.published
    assert published.headers["x-b24-event-handler-id"] == "41"
    auth = json.loads(published.body)["auth"]
    assert (auth["expires_in"], auth["user_id"]) == (3600, 1)  # the body is as sent
    for bad in (True, [1], {"a": 1}):  # numbers become their decimal strings
        event["auth"]["expires_in"] = bad
        resp = await client.post("/b24/events", data=json.dumps(event), headers=JSON)
        assert resp.status == 400 and (await resp.json())["field"] == "auth[expires_in]"
    assert len(sink.published) == 1


async def test_a_refusal_does_not_echo_a_huge_key(
    client: TestClient[Any, Any], sink: MemorySink
) -> None:
    key = "k" * 500_000 + "]"
    body = await refused_400(client, sink, data=f"event=ONX&{key}=1".encode(), headers=FORM)
    assert len(json.dumps(body)) < 1000
