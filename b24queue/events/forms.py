"""PHP-style bracket forms (what Bitrix24 POSTs) to nested dicts, and back.

Decoding is exact and lossless: every value stays a string, `[]` appends to a list. An array whose
keys are exactly 0, 1, ..., n-1 in that order becomes a list, as PHP's `json_encode` renders it,
so a handler sees one shape whether the event came as a form or as JSON (`ATTACH[0]`,
`ATTACH[1]` -> a list; keys such as `101`, or 0..n-1 out of order, stay an object). Anything PHP
would resolve by silently overwriting (a duplicate key, `a=1&a[b]=2`) is refused instead: the
ingress must not publish an event that differs from what the portal sent.

Cost is linear in the body: no step builds per-value strings that grow with the key or the depth.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any
from urllib.parse import unquote_to_bytes, urlencode

from b24queue.errors import BadEventError

MAX_DEPTH = 32
MAX_FIELDS = 10_000

_END = object()
Segment = str | None  # None stands for "[]" (append)


def decode_form(body: bytes) -> dict[str, Any]:
    """Decode an `application/x-www-form-urlencoded` body with bracket keys."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadEventError(f"body is not valid UTF-8 (byte {exc.start})") from None
    chunks = [c for c in text.split("&") if c]
    if len(chunks) > MAX_FIELDS:
        raise BadEventError(f"too many fields: {len(chunks)} (at most {MAX_FIELDS})")
    root: dict[str, Any] = {}
    for chunk in chunks:
        raw_key, _, raw_value = chunk.partition("=")
        key, path = _parse_key(raw_key)
        value = _unquote(raw_value, what="value", field=key) if raw_value else ""
        _insert(root, key, path, value)
    # A list starts at key 0: a body with no `[0]` (plain or percent-encoded) has none to make.
    # (The regex tries every position; the substring tests first skip most bodies at C speed.)
    if ("0]" in text or "0%5" in text) and _ZERO_KEY.search(text):
        return _php_lists(root)
    return root


# Only short keys are cached: a portal sends the same few dozen short keys every time, while a
# caller's long random keys would otherwise pin up to 4,096 of them (each up to the body size).
MAX_CACHED_KEY = 200
_ZERO_KEY = re.compile(r"(?:\[|%5[bB])0(?:\]|%5[dD])")


def _parse_key(raw_key: str) -> tuple[str, list[Segment]]:
    """Decoded key and its path. (Callers never mutate the returned path.)"""
    if len(raw_key) <= MAX_CACHED_KEY:
        return _parse_key_cached(raw_key)
    return _parse_key_uncached(raw_key)


def _parse_key_uncached(raw_key: str) -> tuple[str, list[Segment]]:
    key = _unquote(raw_key, what="key", field=raw_key)
    base, segments = split_key(key)
    return key, [base, *segments]


# Errors are not cached: they are raised anew.
_parse_key_cached = functools.lru_cache(maxsize=4096)(_parse_key_uncached)


def _php_lists(node: dict[str, Any]) -> dict[str, Any]:
    """Turn every object whose keys are exactly "0".."n-1", in order, into a list (in place,
    bottom-up, each container visited once)."""
    stack: list[Any] = [node]
    order: list[Any] = []
    while stack:
        current = stack.pop()
        order.append(current)
        children = current.values() if isinstance(current, dict) else current
        stack.extend(c for c in children if isinstance(c, dict | list))
    for current in reversed(order):  # children before their parents
        items = current.items() if isinstance(current, dict) else enumerate(current)
        for k, child in list(items):
            if isinstance(child, dict) and child and _is_sequence(child):
                current[k] = list(child.values())
    return node


def _is_sequence(obj: dict[str, Any]) -> bool:
    return all(key == str(i) for i, key in enumerate(obj))


def decode_json(body: bytes) -> dict[str, Any]:
    """Decode a JSON body of the same shape as a decoded form."""
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise BadEventError(f"body is not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BadEventError(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise BadEventError(f"body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise BadEventError(f"body is not acceptable JSON: {str(exc)[:100]}") from None
    if not isinstance(value, dict):
        raise BadEventError("JSON body must be an object")
    _check_tree(value)
    return value


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON: published, they would break every standard consumer.
    raise BadEventError(f"body is not valid JSON: {name} is not a JSON number")


_SURROGATE = re.compile("[\ud800-\udfff]")


def split_key(key: str) -> tuple[str, list[Segment]]:
    """`data[FIELDS][ID]` -> ("data", ["FIELDS", "ID"]); `a[]` -> ("a", [None])."""
    open_at = key.find("[")
    if open_at == -1:
        if "]" in key:
            raise BadEventError(f"unbalanced brackets in key {_shown(key)}", field=key)
        if not key:
            raise BadEventError("empty field name", field=key)
        return key, []
    base, rest = key[:open_at], key[open_at:]
    if not base or "]" in base:
        raise BadEventError(f"malformed key {_shown(key)}: a name must come before '['", field=key)
    segments: list[Segment] = []
    pos = 0
    while pos < len(rest):
        close = rest.find("]", pos + 1)
        if rest[pos] != "[" or close == -1 or "[" in rest[pos + 1 : close]:
            raise BadEventError(f"unbalanced brackets in key {_shown(key)}", field=key)
        segment = rest[pos + 1 : close]
        segments.append(segment if segment else None)
        pos = close + 1
    if len(segments) > MAX_DEPTH:
        raise BadEventError(f"key {_shown(key)} nests deeper than {MAX_DEPTH} levels", field=key)
    return base, segments


def encode_form(fields: dict[str, Any]) -> bytes:
    """Encode nested dicts/lists of strings the way Bitrix24 (PHP's http_build_query) does.

    Lists of plain values use `[]`; lists holding containers use their index, since `[]` could not
    say which element a nested key belongs to.
    """
    pairs: list[tuple[str, str]] = []
    for name, value in fields.items():
        _flatten(name, value, pairs)
    return urlencode(pairs).encode("ascii")


_CHUNK = 1 << 16


def _percent_decode(text: str) -> str:
    """`+` and %XX as browsers send them, decoded as strict UTF-8.

    urllib's unquote holds a Python object per escape (~230 bytes each: 70 MB for one 900 kB
    value); decoding in 64 kB pieces keeps the peak near the size of the body.
    """
    if "%" not in text:
        return text.replace("+", " ")
    if len(text) <= _CHUNK:  # the common case: one piece
        return unquote_to_bytes(text.replace("+", " ")).decode("utf-8")
    data = text.replace("+", " ").encode("utf-8")
    out = bytearray()
    start = 0
    while start < len(data):
        end = min(start + _CHUNK, len(data))
        if end < len(data):
            cut = data.rfind(b"%", max(start, end - 2), end)
            if cut > start:
                end = cut  # never split an escape between two pieces
        out += unquote_to_bytes(data[start:end])
        start = end
    return out.decode("utf-8")


def _unquote(raw: str, *, what: str, field: str) -> str:
    try:
        return _percent_decode(raw)
    except UnicodeDecodeError:
        raise BadEventError(
            f"{what} of field {_shown(field)} has percent-escapes that are not UTF-8",
            field=field,
        ) from None


def _insert(root: dict[str, Any], key: str, path: list[Segment], value: str) -> None:
    # Most fields are `name=` or `name[key]=` given once: those go straight in. Anything else
    # (deeper, `[]`, or a key already there, which is an error) takes the general walk below.
    if len(path) == 1:
        name = path[0]
        if name not in root:
            root[name] = value  # type: ignore[index]
            return
    elif len(path) == 2 and path[1] is not None:
        name, segment = path
        parent = root.get(name, _END)  # type: ignore[arg-type]
        if parent is _END:
            root[name] = {segment: value}  # type: ignore[index]
            return
        if type(parent) is dict and segment not in parent:
            parent[segment] = value
            return
    _insert_walk(root, key, path, value)


def _insert_walk(root: dict[str, Any], key: str, path: list[Segment], value: str) -> None:
    node: Any = root
    for i, segment in enumerate(path):
        following = path[i + 1] if i + 1 < len(path) else _END
        if segment is None:
            # The parent made this node a list because its segment was "[]".
            if following is _END:
                node.append(value)
                return
            child: Any = [] if following is None else {}
            node.append(child)
            node = child
            continue
        existing = node.get(segment, _END)
        if following is _END:
            if existing is not _END:
                raise BadEventError(
                    f"conflicting key {_shown(key)}: {_path_text(path, i)} was already given",
                    field=key,
                )
            node[segment] = value
            return
        wanted = list if following is None else dict
        if existing is _END:
            existing = wanted()
            node[segment] = existing
        elif type(existing) is not wanted:
            raise BadEventError(
                f"conflicting key {_shown(key)}: {_path_text(path, i)} is already "
                f"{_kind(existing)}, cannot also be {_kind(wanted())}",
                field=key,
            )
        node = existing


MAX_SHOWN = 100  # a key quoted in an error: enough to find it, not a copy of a 1 MB key


def _shown(key: str) -> str:
    return repr(key[:MAX_SHOWN]) + ("..." if len(key) > MAX_SHOWN else "")


def _path_text(path: list[Segment], upto: int) -> str:
    head, *rest = path[: upto + 1]
    return _shown(str(head) + "".join(f"[{s or ''}]" for s in rest))


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "a value"


def _check_tree(root: dict[str, Any]) -> None:
    """Depth at most MAX_DEPTH (as in forms: a top-level key is at depth 0) and no lone surrogate
    (`"\\ud800"` decodes, but cannot be encoded again), in one pass linear in the size of the
    tree: the field's path is built only for the error."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(root, -1, ())]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            where = _field(path)
            raise BadEventError(f"{where} nests deeper than {MAX_DEPTH} levels", field=where)
        if isinstance(value, float) and not math.isfinite(value):
            where = _field(path)  # `1e400` parses to inf, which is not JSON
            raise BadEventError(f"{where} is a number out of range", field=where)
        if isinstance(value, str):
            if _SURROGATE.search(value):
                where = _field(path)
                raise BadEventError(f"{where} is not valid Unicode (a lone surrogate)", field=where)
        elif isinstance(value, dict):
            for k, v in value.items():
                if _SURROGATE.search(k):
                    where = _field((path, "?"))
                    raise BadEventError(f"a key in {where} is not valid Unicode", field=where)
                stack.append((v, depth + 1, (path, k)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, (path, i)) for i, v in enumerate(value))


def _field(path: tuple[Any, ...]) -> str:
    """`(((), "data"), "FIELDS")` -> `data[FIELDS]` (paths are linked pairs: no copies)."""
    parts: list[str] = []
    while path:
        path, part = path
        parts.append(str(part)[:100])
    parts.reverse()
    if not parts:
        return "body"
    return parts[0] + "".join(f"[{p}]" for p in parts[1:])


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}[{k}]", v, out)
    elif isinstance(value, list):
        scalar = all(not isinstance(v, dict | list) for v in value)
        for i, v in enumerate(value):
            _flatten(f"{prefix}[]" if scalar else f"{prefix}[{i}]", v, out)
    elif value is None:
        out.append((prefix, ""))
    else:
        out.append((prefix, str(value)))
