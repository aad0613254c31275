"""Hostile and random bodies: the decoder and the endpoint answer 4xx or 200, never 500, never
hang, publish nothing they refuse, and stay within bounded memory."""

from __future__ import annotations

import contextlib
import time
import tracemalloc
from urllib.parse import quote

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b24queue.auth.tokens import StaticTokens
from b24queue.errors import BadEventError
from b24queue.events.forms import MAX_DEPTH, MAX_FIELDS, decode_form
from b24queue.ingress.app import create_app
from b24queue.settings import load_settings
from tests.support.samples import SAMPLE_TOKEN
from tests.support.sinks import MemorySink

segment = st.one_of(
    st.just(""), st.text(alphabet="ab0[]%=&+ ", max_size=4), st.sampled_from(["ID", "0", "FIELDS"])
)
key = st.builds(
    lambda base, segs: base + "".join(f"[{s}]" for s in segs),
    st.text(alphabet="abe[]%", min_size=0, max_size=5),
    st.lists(segment, max_size=5),
)
pairs = st.lists(st.tuples(key, st.text(max_size=20)), max_size=30)
form_bodies = st.one_of(
    st.binary(max_size=500),
    pairs.map(lambda ps: "&".join(f"{quote(k)}={quote(v)}" for k, v in ps).encode()),
    pairs.map(lambda ps: "&".join(f"{k}={v}" for k, v in ps).encode("utf-8", "surrogatepass")),
)


@settings(max_examples=400, deadline=2000)
@given(form_bodies)
def test_decoder_returns_a_dict_or_a_bad_event_error(body: bytes) -> None:
    try:
        result = decode_form(body)
    except BadEventError as exc:
        assert str(exc)
    else:
        assert isinstance(result, dict)


TYPES = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "application/json",
        "text/plain",
        "",
        "application/x-www-form-urlencoded; charset=utf-8",
        "multipart/form-data; boundary=x",
    ]
)
json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
).map(lambda v: __import__("json").dumps(v).encode())


@settings(
    max_examples=150,
    deadline=3000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.one_of(form_bodies, json_bodies), content_type=TYPES)
async def test_endpoint_never_fails_and_publishes_nothing_it_refuses(
    body: bytes, content_type: str
) -> None:
    sink = MemorySink()
    app = create_app(load_settings(app_tokens=SAMPLE_TOKEN), sink, StaticTokens((SAMPLE_TOKEN,)))
    async with TestClient(TestServer(app)) as client:
        headers = {"Content-Type": content_type} if content_type else {}
        resp = await client.post("/b24/events", data=body, headers=headers)
        assert resp.status in (200, 400, 401, 413, 415), (resp.status, await resp.text())
        assert "error" in await resp.json() or resp.status == 200
        if resp.status != 200:
            assert sink.published == []


def test_worst_case_bodies_stay_fast_and_bounded() -> None:
    """The largest hostile forms we accept to parse: many fields, deep keys, long values."""
    deep = "a" + "[x]" * MAX_DEPTH
    cases = {
        "many fields": "&".join(f"f{i}[a][b]=v" for i in range(MAX_FIELDS)),
        "deep keys": "&".join(
            f"{deep}[{i}]=v".replace("[x]", f"[x{i % 7}]", 1) for i in range(300)
        ),
        "long value": "event=ONX&x=" + "%41" * 300_000,
        "many []": "a[]=" + "&a[]=".join("v" for _ in range(MAX_FIELDS - 1)),
    }
    for name, text in cases.items():
        body = text.encode()
        assert len(body) <= 1024 * 1024, name
        tracemalloc.start()
        started = time.perf_counter()
        with contextlib.suppress(BadEventError):
            decode_form(body)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < 2.0, (name, elapsed)
        assert peak < 16 * 1024 * 1024, (name, peak)  # a 1 MiB body, ~9 MB at worst
