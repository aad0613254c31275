"""The HTTP surface with an in-memory sink: status codes, messages, and that refusals publish
nothing. The real-broker path is in tests/integration/test_ingress.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from b24queue.auth.tokens import StaticTokens
from b24queue.errors import BrokerUnavailableError, PublishError
from b24queue.ingress.app import create_app
from b24queue.settings import load_settings
from tests.support.samples import FORM, SAMPLE_NAMES, SAMPLE_TOKEN, sample_form
from tests.support.sinks import MemorySink


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
async def client(sink: MemorySink) -> AsyncIterator[TestClient[object, object]]:
    # Small, for the 413s below; over the largest sample (4.8 kB).
    settings = load_settings(app_tokens=SAMPLE_TOKEN, max_body_bytes=8192)
    app = create_app(settings, sink, StaticTokens(settings.app_tokens))
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.mark.parametrize("name", SAMPLE_NAMES)
async def test_sample_is_accepted_with_its_message_id(
    client: TestClient[object, object], sink: MemorySink, name: str
) -> None:
    resp = await client.post("/b24/events", data=sample_form(name), headers=FORM)
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "accepted"
    assert [e.message_id for e in sink.published] == [body["message_id"]]


async def refused(
    client: TestClient[object, object], sink: MemorySink, status: int, **kw: object
) -> dict[str, str]:
    resp = await client.request(kw.pop("method", "POST"), "/b24/events", **kw)  # type: ignore[arg-type]
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body: dict[str, str] = await resp.json()
    assert sink.published == []
    assert SAMPLE_TOKEN not in json.dumps(body)
    return body


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (b"a=1&a[b]=2&event=ONX", "a[b]", "conflicting key"),
        (b"event=ONX&data[x=1", "data[x", "unbalanced brackets"),
        (b"event=ONX&a" + b"[x]" * 33 + b"=1", None, "deeper than 32"),
        (b"event_handler_id=1", "event", "event: is required"),
        (b"event=ON..X", "event", "must be a Bitrix24 event name"),
        (b"event=ONX&ts=later", "ts", "ts: Input should be a valid integer"),
        # The app's own messages (b24queue.publishing): never from outside, whatever the token.
        (
            b"event=app.deal.recheck&auth[application_token]=" + SAMPLE_TOKEN.encode(),
            "event",
            "the app's own",
        ),
    ],
)
async def test_malformed_bodies_get_400_naming_the_field(
    client: TestClient[object, object],
    sink: MemorySink,
    data: bytes,
    field: str | None,
    words: str,
) -> None:
    body = await refused(client, sink, 400, data=data, headers=FORM)
    assert words in body["error"]
    if field:
        assert body["field"] == field


async def test_too_many_fields(client: TestClient[object, object], sink: MemorySink) -> None:
    settings = load_settings(app_tokens=SAMPLE_TOKEN)
    app = create_app(settings, sink, StaticTokens(settings.app_tokens))
    async with TestClient(TestServer(app)) as big:
        data = "event=ONX&" + "&".join(f"f{i}=1" for i in range(10_001))
        body = await refused(big, sink, 400, data=data.encode(), headers=FORM)
    assert "too many fields" in body["error"]


async def test_wrong_or_missing_token_is_401(
    client: TestClient[object, object], sink: MemorySink
) -> None:
    wrong = sample_form("crm-deal-add").replace(SAMPLE_TOKEN.encode(), b"f" * 32)
    body = await refused(client, sink, 401, data=wrong, headers=FORM)
    assert "does not match" in body["error"]
    body = await refused(client, sink, 401, data=b"event=ONX", headers=FORM)
    assert "missing" in body["error"]


async def test_too_large_is_413(client: TestClient[object, object], sink: MemorySink) -> None:
    body = await refused(client, sink, 413, data=b"event=ONX&x=" + b"a" * 9000, headers=FORM)
    assert "exceeds 8192 bytes" in body["error"]


async def test_chunked_too_large_is_413(
    client: TestClient[object, object], sink: MemorySink
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"event=ONX&x="
        for _ in range(10):
            yield b"a" * 1000

    await refused(client, sink, 413, data=chunks(), headers=FORM)


async def test_unsupported_type_is_415(
    client: TestClient[object, object], sink: MemorySink
) -> None:
    body = await refused(
        client, sink, 415, data=b"event=ONX", headers={"Content-Type": "text/plain"}
    )
    assert "text/plain" in body["error"]


async def test_wrong_method_is_405(client: TestClient[object, object], sink: MemorySink) -> None:
    body = await refused(client, sink, 405, method="GET")
    assert "GET not allowed" in body["error"]


async def test_json_is_accepted(client: TestClient[object, object], sink: MemorySink) -> None:
    resp = await client.post(
        "/b24/events", json={"event": "ONX", "auth": {"application_token": SAMPLE_TOKEN}}
    )
    assert resp.status == 200
    assert len(sink.published) == 1


@pytest.mark.parametrize(
    "failure",
    [BrokerUnavailableError("RabbitMQ did not confirm within 0.75s"), PublishError("nack")],
)
async def test_not_stored_is_503_with_retry_after(
    client: TestClient[object, object], sink: MemorySink, failure: Exception
) -> None:
    sink.fail = failure
    resp = await client.post("/b24/events", data=sample_form("crm-deal-add"), headers=FORM)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    assert "not stored" in (await resp.json())["error"]


async def test_health_and_readiness(client: TestClient[object, object], sink: MemorySink) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    sink.ready = False
    assert (await client.get("/readyz")).status == 503
    assert (await client.get("/healthz")).status == 200


async def test_unknown_path_is_json_404(client: TestClient[object, object]) -> None:
    resp = await client.get("/nope")
    assert resp.status == 404
    assert "error" in await resp.json()
