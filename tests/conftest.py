from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT_DIR = Path(__file__).parents[1]
SAMPLES = Path(__file__).parent / "samples"
SAMPLE_TOKEN = "9d1c7e5a3b8f4e2d6c0a9b7e5d3c1f8a"
SAMPLE_NAMES = sorted(p.stem for p in SAMPLES.glob("*.form"))


def sample_form(name: str) -> bytes:
    return (SAMPLES / f"{name}.form").read_bytes().strip()


def sample_json(name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text())
    return value


def sample_decoded(name: str) -> dict[str, Any]:
    """What the decoder makes of `NAME.form`: the `.lists.json` twin where there is one (keys
    0..n-1 become lists, as PHP's json_encode renders them), else `NAME.json`."""
    twin = SAMPLES / f"{name}.lists.json"
    if twin.exists():
        value: dict[str, Any] = json.loads(twin.read_text())
        return value
    return sample_json(name)


def sample_published(name: str) -> dict[str, Any]:
    """The message body the ingress publishes for a sample: decoded, less the application token
    (verified at the edge, never handed on) wherever it is: bot and command events repeat it deep
    in `data`."""
    value = sample_decoded(name)
    for node in nodes(value):
        if isinstance(node, dict):
            node.pop("application_token", None)
    return value


def nodes(root: Any) -> list[Any]:
    """Every value in `root`, itself included, at any depth of its dicts and lists."""
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        found.append(node)
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def token_keys(root: Any) -> int:
    """How many `application_token` keys `root` holds, at any depth."""
    return sum(isinstance(n, dict) and "application_token" in n for n in nodes(root))


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(autouse=True)
def _clean_b24queue_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests build their own settings: a developer's B24QUEUE_* variables must not leak in."""
    for key in list(os.environ):
        if key.upper().startswith("B24QUEUE_"):
            monkeypatch.delenv(key)
    yield


@pytest.fixture(scope="session")
def portal_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.fake_portal import make_certificate

    return make_certificate(tmp_path_factory.mktemp("portal-tls"))


@pytest.fixture
async def fake_portal(portal_certificate: tuple[Path, Path]) -> Any:
    from tests.fake_portal import FakePortal

    portal = FakePortal(*portal_certificate)
    await portal.start()
    try:
        yield portal
    finally:
        await portal.stop()


@pytest.fixture(autouse=True)
async def _no_process_left() -> AsyncIterator[None]:
    """A failing test must not leave the processes it started (tests.processes) running."""
    yield
    from tests.processes import kill_leftovers

    await kill_leftovers()
