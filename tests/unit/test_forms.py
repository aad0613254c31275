from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from b24queue.errors import BadEventError
from b24queue.events import forms
from b24queue.events.forms import (
    MAX_DEPTH,
    MAX_FIELDS,
    decode_form,
    decode_json,
    encode_form,
    split_key,
)
from tests.support.samples import SAMPLE_NAMES, sample_decoded, sample_form, sample_json


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_every_sample_decodes_to_its_json_twin(name: str) -> None:
    assert decode_form(sample_form(name)) == sample_decoded(name)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_encode_then_decode_is_lossless(name: str) -> None:
    decoded = sample_decoded(name)
    assert decode_form(encode_form(decoded)) == decoded


def test_the_object_shape_twin_is_the_same_event_before_the_list_rule() -> None:
    # imbot-message-add.json shows ATTACH[0], ATTACH[1] as PHP prints the array (an object);
    # its .lists.json twin is what json_encode (and so our decoder) makes of it.
    objects, lists = sample_json("imbot-message-add"), sample_decoded("imbot-message-add")
    attach = objects["data"]["PARAMS"]["ATTACH"]
    assert list(attach) == ["0", "1"]
    assert lists["data"]["PARAMS"]["ATTACH"] == [attach["0"], attach["1"]]
    assert decode_form(encode_form(objects)) == lists


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"a[0]=x&a[1]=y", ["x", "y"]),
        (b"a[1]=x&a[0]=y", {"1": "x", "0": "y"}),  # 0..n-1 out of order stays an object
        (b"a[101]=x", {"101": "x"}),
        (b"a[0]=x&a[2]=y", {"0": "x", "2": "y"}),  # a gap
        (b"a[00]=x", {"00": "x"}),
        (b"a[1]=x", {"1": "x"}),
        (b"a[0][0]=x&a[0][1]=y&a[1][k]=z", [["x", "y"], {"k": "z"}]),
        (b"a[0][]=x&a[0][]=y", [["x", "y"]]),
        (b"a[UF][0]=1&a[UF][1]=2", {"UF": ["1", "2"]}),
    ],
)
def test_arrays_keyed_0_to_n_minus_1_in_order_become_lists(body: bytes, expected: object) -> None:
    assert decode_form(body) == {"a": expected}


def test_values_stay_strings_and_escapes_decode_like_browsers() -> None:
    body = b"a=1&b=%D0%9F%D1%80%D0%B8+%26+%3D&c=x%2By&d=&e"
    assert decode_form(body) == {"a": "1", "b": "При & =", "c": "x+y", "d": "", "e": ""}


def test_brackets_nest_and_empty_brackets_append() -> None:
    body = b"data[FIELDS][ID]=7&tags[]=a&tags[]=b&rows[][x]=1&rows[][x]=2&m[0]=z"
    assert decode_form(body) == {
        "data": {"FIELDS": {"ID": "7"}},
        "tags": ["a", "b"],
        "rows": [{"x": "1"}, {"x": "2"}],
        "m": ["z"],
    }


@pytest.mark.parametrize(
    "raw",
    [
        "a+b%20c",
        "%D0%9F%D1%80%D0%B8%D0%B2%D0%B5%D1%82",
        "100%",
        "%zz%4",
        "Я+%D0%AF",
        "x" * 10,
        "%41" * 70_000,
        "é%C3%A9" * 30_000,
    ],
)
def test_percent_decoding_matches_urllib(raw: str) -> None:
    from urllib.parse import unquote_plus

    assert decode_form(f"k={raw}".encode()) == {"k": unquote_plus(raw, errors="strict")}


def test_percent_encoded_brackets_are_brackets() -> None:
    assert decode_form(b"data%5BFIELDS%5D%5BID%5D=1") == {"data": {"FIELDS": {"ID": "1"}}}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b"a=1&a[b]=2", "a[b]", "conflicting key"),
        (b"a[b]=2&a=1", "a", "conflicting key"),
        (b"a=1&a=2", "a", "already given"),
        (b"a[]=1&a[x]=2", "a[x]", "a list"),
        (b"a[x]=1&a[]=2", "a[]", "an object"),
        (b"a[b=1", "a[b", "unbalanced"),
        (b"a]=1", "a]", "unbalanced"),
        (b"a[b]c=1", "a[b]c", "unbalanced"),
        (b"a[b[c]]=1", "a[b[c]]", "unbalanced"),
        (b"[x]=1", "[x]", "name must come before"),
    ],
)
def test_malformed_keys_are_refused_naming_the_key(body: bytes, field: str, words: str) -> None:
    with pytest.raises(BadEventError) as info:
        decode_form(body)
    assert info.value.field == field
    assert words in str(info.value)
    assert repr(field) in str(info.value) or field in str(info.value)


def test_nesting_limit() -> None:
    ok = "a" + "[x]" * MAX_DEPTH + "=1"
    decode_form(ok.encode())
    too_deep = "a" + "[x]" * (MAX_DEPTH + 1) + "=1"
    with pytest.raises(BadEventError, match="deeper than 32"):
        decode_form(too_deep.encode())


def test_field_count_limit() -> None:
    decode_form("&".join(f"f{i}=1" for i in range(MAX_FIELDS)).encode())
    with pytest.raises(BadEventError, match="too many fields: 10001"):
        decode_form("&".join(f"f{i}=1" for i in range(MAX_FIELDS + 1)).encode())


def test_bad_utf8_is_refused() -> None:
    with pytest.raises(BadEventError, match="not valid UTF-8"):
        decode_form(b"a=\xff")
    with pytest.raises(BadEventError, match="not UTF-8") as info:
        decode_form(b"name=%FF")
    assert info.value.field == "name"


def test_split_key() -> None:
    assert split_key("data[FIELDS][ID]") == ("data", ["FIELDS", "ID"])
    assert split_key("a[]") == ("a", [None])
    assert split_key("plain") == ("plain", [])


def test_json_bodies() -> None:
    assert decode_json(json.dumps(sample_json("crm-deal-add")).encode()) == sample_json(
        "crm-deal-add"
    )
    with pytest.raises(BadEventError, match="not valid JSON"):
        decode_json(b"{nope")
    with pytest.raises(BadEventError, match="must be an object"):
        decode_json(b"[1]")
    deep: object = "x"
    for _ in range(MAX_DEPTH + 1):
        deep = {"k": deep}
    with pytest.raises(BadEventError, match="deeper than 32"):
        decode_json(json.dumps({"a": deep}).encode())
    with pytest.raises(BadEventError, match="deeper than 32"):
        decode_json(b"[" * 100_000)


_KEYS = st.sampled_from(["a", "b", "a[x]", "a[y]", "a[]", "a[x][z]", "a[0]", "a[1]", "b[0][x]"])
_VALUES = st.sampled_from(["", "1", "x+y", "%C3%BC", "%5B0%5D", "%FF"])


@given(st.lists(st.tuples(_KEYS, _VALUES), max_size=6))
def test_the_shortcuts_decide_as_the_general_walk(fields: list[tuple[str, str]]) -> None:
    """Fields of one or two levels go in without the general walk: same result, same refusals."""
    body = "&".join(f"{k}={v}" for k, v in fields).encode()

    def outcome() -> object:
        try:
            return decode_form(body)
        except BadEventError as exc:
            return ("refused", str(exc), exc.field)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(forms, "_insert", forms._insert_walk)
        expected = outcome()
    assert outcome() == expected
