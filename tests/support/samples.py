"""The real-shaped Bitrix24 requests of tests/samples: their forms, their JSON, what the decoder
and the ingress make of them, and the application token they carry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLES = Path(__file__).parents[1] / "samples"
SAMPLE_TOKEN = "9d1c7e5a3b8f4e2d6c0a9b7e5d3c1f8a"
SAMPLE_NAMES = sorted(p.stem for p in SAMPLES.glob("*.form"))
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


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
    """The message body the ingress publishes for a sample: decoded, less every token (the
    application token, verified at the edge, and the OAuth pair: never handed on) wherever it is:
    bot and command events repeat them deep in `data`."""
    value = sample_decoded(name)
    for node in nodes(value):
        if isinstance(node, dict):
            for key in TOKEN_KEYS:
                node.pop(key, None)
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


TOKEN_KEYS = ("application_token", "access_token", "refresh_token")


def token_keys(root: Any, keys: tuple[str, ...] = TOKEN_KEYS) -> int:
    """How many token keys (`TOKEN_KEYS`, or `keys`) `root` holds, at any depth."""
    return sum(isinstance(n, dict) and k in n for n in nodes(root) for k in keys)


def token_values(root: Any) -> set[str]:
    """Every value of a token key in `root`, at any depth."""
    return {
        n[k]
        for n in nodes(root)
        if isinstance(n, dict)
        for k in TOKEN_KEYS
        if isinstance(n.get(k), str)
    }
