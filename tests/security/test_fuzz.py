"""Fuzzing the decoder and the whole ingress app in process.

- atheris (coverage-guided, libFuzzer): tests/fuzz/ingress_target.py from the samples as seeds.
  `make test` runs FUZZ_RUNS inputs (default 20,000, about 15 s); `make fuzz` runs it for minutes.
- hypothesis: hostile Bitrix24-shaped bodies (values from a list of known troublemakers, in every
  field that reaches a header, the routing key or the store), FUZZ_EXAMPLES of them (default 300).

Invariants either way: never a 500, nothing published for a refusal, and what is published is
strict JSON, without an `application_token` key at any depth, with bounded headers; memory
bounded (libFuzzer's -rss_limit_mb).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b24queue.auth.tokens import StaticTokens
from b24queue.ingress.app import create_app
from b24queue.settings import load_settings
from tests.support.processes import ROOT
from tests.support.samples import SAMPLE_NAMES, SAMPLE_TOKEN, SAMPLES, token_keys
from tests.support.sinks import MemorySink

RUNS = int(os.environ.get("FUZZ_RUNS", "20000"))
SECONDS = int(os.environ.get("FUZZ_SECONDS", "0"))  # 0: bounded by RUNS only
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))


def seed_corpus(directory: Path) -> None:
    """Each sample, as a form and as JSON, down both paths of the target (first byte: path)."""
    for name in SAMPLE_NAMES:
        form = (SAMPLES / f"{name}.form").read_bytes().strip()
        as_json = (SAMPLES / f"{name}.json").read_bytes()
        for mode, body in ((0, form), (1, as_json), (2, form), (3, as_json)):
            (directory / f"{name}.{mode}").write_bytes(bytes([mode]) + body)


FINDINGS = ("crash-", "leak-", "timeout-", "oom-", "slow-unit-")


def run_target(tmp_path: Path, *fuzzer_args: str, prelude: str = "") -> tuple[int, str]:
    """The atheris target over the samples as seeds; its exit code and stderr. `prelude` runs in
    the target's process before it starts (the slow-exit test plants a finalizer with it)."""
    corpus, seeds = tmp_path / "corpus", tmp_path / "seeds"
    corpus.mkdir()
    seeds.mkdir()
    seed_corpus(seeds)
    code = f"{prelude}\nfrom tests.fuzz.ingress_target import main\nmain()"
    args = [sys.executable, "-c", code, *fuzzer_args]
    args += ["-rss_limit_mb=768", "-max_len=65536", f"-artifact_prefix={tmp_path}/"]
    args += [str(corpus), str(seeds)]
    done = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=max(600, SECONDS * 2)
    )
    return done.returncode, done.stderr


@pytest.mark.long
def test_coverage_guided_fuzzing_finds_nothing(tmp_path: Path) -> None:
    """Judged on findings (an artifact libFuzzer writes for a crash, leak, timeout or memory
    past -rss_limit_mb) and a clean exit, not on the machine's speed: an input is a hang only
    past 60 s, and the run is bounded by its count of inputs."""
    pytest.importorskip("atheris", reason="atheris installs on Linux x86_64 (make install)")
    args = [f"-atheris_runs={RUNS}", "-timeout=60"]
    if SECONDS:
        args.append(f"-max_total_time={SECONDS}")
    returncode, stderr = run_target(tmp_path, *args)
    tail = "\n".join(stderr.splitlines()[-40:])
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(FINDINGS))
    assert not found, f"findings: {found}\n{tail}"
    assert returncode == 0, tail
    assert "Done" in stderr, tail
    summary = [line for line in stderr.splitlines() if "cov:" in line or "Done" in line]
    print("\n".join(summary[-2:]))


# A finalizer that takes 3 s, in a reference cycle: freed by the collection Python makes once it
# has set SIGALRM back to its default action, as a busy machine's slow exit was.
SLOW_EXIT = """
import gc, time
class SlowToFree:
    def __del__(self, _sleep=time.sleep):
        _sleep(3)
slow = SlowToFree(); slow.me = slow; del slow
gc.disable()
"""


def test_a_slow_exit_after_a_clean_run_is_not_killed_by_the_per_input_alarm(
    tmp_path: Path,
) -> None:
    """libFuzzer's per-input timer ticks every timeout/2 + 1 s (here 2 s); a 3 s exit after the
    last input met it, and the process died of SIGALRM (-14) after "Done" (seen in CI)."""
    pytest.importorskip("atheris", reason="atheris installs on Linux x86_64 (make install)")
    returncode, stderr = run_target(tmp_path, "-atheris_runs=50", "-timeout=2", prelude=SLOW_EXIT)
    tail = "\n".join(stderr.splitlines()[-20:])
    assert "Done 50" in stderr, tail
    assert returncode == 0, f"exit {returncode}\n{tail}"


# Values that broke or could break something: sizes, separators, encodings, numbers.
NASTY = st.sampled_from(
    [
        "",
        "a" * 300,
        "a" * 70_000,
        "x\ny",
        "x\r\nX-Forged: 1",
        "\u2028",
        "%00",
        "пример.рф",
        "xn--e1afmkfd.xn--p1ai",
        "127.0.0.1",
        "[::1]",
        "a.b.c:443",
        "a.b:99999",
        "*",
        "#",
        "A.#",
        "..",
        "ONCRMDEALADD\n",
        "CATALOG.PRODUCT.ON.ADD",
        "9" * 30,
        "1e400",
        "\x00",
        "😀" * 1000,
    ]
)
FIELD = st.sampled_from(
    [
        "event",
        "event_handler_id",
        "ts",
        "auth[domain]",
        "auth[member_id]",
        "auth[application_token]",
        "auth[client_endpoint]",
        "auth[expires_in]",
        "data[FIELDS][ID]",
        "data[ATTACH][0]",
        "data[ATTACH][1][x]",
        "data[BOT][7][application_token]",  # bot and command events repeat the token in data
        "data[COMMAND][9][AUTH][application_token]",
        "data[bot][auth][application_token]",
        "data[ATTACH][0][application_token]",
        "name",
    ]
)
JSON_VALUE = st.one_of(
    NASTY,
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.lists(NASTY, max_size=3),
)


def hostile_form(changes: list[tuple[str, str]]) -> bytes:
    base = {"event": "ONCRMDEALADD", "auth[application_token]": SAMPLE_TOKEN}
    base.update(dict(changes))
    return "&".join(f"{quote(k)}={quote(v)}" for k, v in base.items()).encode()


def hostile_json(changes: list[tuple[str, Any]]) -> bytes:
    body: dict[str, Any] = {"event": "ONCRMDEALADD", "auth": {"application_token": SAMPLE_TOKEN}}
    for field, value in changes:
        head, _, rest = field.partition("[")
        if not rest:
            body[head] = value
            continue
        node = body.setdefault(head, {})
        keys = rest.rstrip("]").split("][")
        for key in keys[:-1]:
            child = node.get(key)
            node = node[key] = child if isinstance(child, dict) else {}
        node[keys[-1]] = value
    return json.dumps(body).encode()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    form=st.booleans(),
    form_changes=st.lists(st.tuples(FIELD, NASTY), max_size=4),
    json_changes=st.lists(st.tuples(FIELD, JSON_VALUE), max_size=4),
)
async def test_hostile_bitrix24_shaped_bodies(
    form: bool, form_changes: list[tuple[str, str]], json_changes: list[tuple[str, Any]]
) -> None:
    sink = MemorySink()
    app = create_app(load_settings(app_tokens=SAMPLE_TOKEN), sink, StaticTokens((SAMPLE_TOKEN,)))
    body = hostile_form(form_changes) if form else hostile_json(json_changes)
    content_type = "application/x-www-form-urlencoded" if form else "application/json"
    quiet = logging.getLogger("b24queue.ingress.app")  # a refusal logs a line: thousands here
    level, quiet.level = quiet.level, logging.ERROR
    try:
        async with TestClient(TestServer(app)) as client:
            resp = await client.post(
                "/b24/events", data=body, headers={"Content-Type": content_type}
            )
            text = await resp.text()
    finally:
        quiet.level = level
    assert resp.status in (200, 400, 401), (resp.status, text[:300])
    if resp.status != 200:
        assert sink.published == [] and "error" in json.loads(text)
        return
    [envelope] = sink.published
    published = json.loads(envelope.body, parse_constant=lambda name: pytest.fail(name))
    assert token_keys(published) == 0
    assert sum(len(k) + len(v) for k, v in envelope.headers.items()) <= 1024
