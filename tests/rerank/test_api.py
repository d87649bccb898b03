"""The endpoint's HTTP contract without Ray or a model: the JSON reader, request validation, API keys."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recalign.errors import UserError
from recalign.rerank.api import PREFIX, ApiError, ApiKeys, ApiLimits, parse_request, read_json

LIMITS = ApiLimits()
OK = {"history": ["1", "2"], "ratings": [5, 3.5], "candidates": ["3", "4"]}


def refused(body: bytes) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse_request(read_json(body, LIMITS), LIMITS)
    return err.value


@pytest.mark.parametrize("body, status, field", [
    (b'{"history": ["1"], "ratings": [1e400], "candidates": ["2"]}', 422, "ratings[0]"),
    (b'{"history": ["1"], "ratings": [NaN], "candidates": ["2"]}', 422, "ratings[0]"),
    (b'{"history": ["1"], "ratings": [Infinity], "candidates": ["2"]}', 422, "ratings[0]"),
    (b'{"history": ["1"], "ratings": [' + b"9" * 400 + b'], "candidates": ["2"]}', 422, "ratings[0]"),
    (b'{"history": ["1"], "ratings": [6], "candidates": ["2"]}', 422, "ratings[0]"),
    (b'{"history": ["1"], "ratings": [-1], "candidates": ["2"]}', 422, "ratings[0]"),
    (b'{"history": ["1"], "candidates": ["2"], "top_n": ' + b"9" * 40 + b"}", 422, "top_n"),
    (b'{"history": ["1"], "candidates": ["2"], "top_n": 2}', 422, "top_n"),
    (b'{"history": [1], "candidates": ["2"]}', 422, "history[0]"),
    (b'{"history": ["1"], "candidates": ["2"], "explain": "yes"}', 422, "explain"),
    (b'{"candidates": ["2"]}', 422, "history"),
    (b'{"history": ["1"], "user_id": "1", "candidates": ["2"]}', 422, "history"),
    (b'{"history": ' + json.dumps([str(i) for i in range(201)]).encode() + b', "candidates": ["2"]}', 422, "history"),
    (b'{"history": ["1"], "candidates": ["2", "3", "2"]}', 422, "candidates[2]"),
    (b'{"history": ["1"], "candidates": ' + json.dumps([str(i) for i in range(27)]).encode() + b"}", 422,
     "candidates"),
    (b"[" * 20000 + b"]" * 20000, 400, "body"),
    (b'{"a": ' * 5000 + b"1" + b"}" * 5000, 400, "body"),
    (b"not json", 400, "body"),
    (b"\xff\xfe{}", 400, "body"),
    (b"", 400, "body"),
    (b'"a string"', 422, "body"),
    (b'{"history": [], "candidates": ["' + b"x" * 65 + b'"]}', 422, "candidates[0]"),
    (b'{"history": [], "candidates": ["1"], "extra": 1}', 422, "extra"),
    (b" " * 70000, 413, "body"),
])
def test_every_bad_body_is_a_4xx_naming_the_field(body, status, field):
    err = refused(body)
    assert (err.status, err.field) == (status, field), err.body()
    assert set(err.body()["error"]) == {"field", "message"}


def test_messages_quote_only_a_prefix_of_what_was_sent():
    huge = "z" * 50_000
    for body in [{"history": [], "candidates": ["1"], huge: 1}, {"user_id": huge, "candidates": ["1"]},
                 {"history": ["1"], "ratings": [float("inf")], "candidates": ["2"]}]:
        err = refused(json.dumps(body).encode())
        assert len(err.message) + len(err.field) < 300, (err.field[:100], err.message[:100])
    err = refused(b'{"history": ["1"], "ratings": [' + b"1" * 5000 + b'], "candidates": ["2"]}')
    assert len(err.message) < 2 * PREFIX + 60


def test_a_good_request_parses():
    req = parse_request(read_json(json.dumps(OK).encode(), LIMITS), LIMITS)
    assert req.ratings == [5.0, 3.5] and req.candidates == ["3", "4"] and req.explain is False


def test_limits_are_checked():
    with pytest.raises(UserError, match="max_candidates"):
        ApiLimits(max_candidates=27)
    small = ApiLimits(max_history=1, max_candidates=1)
    with pytest.raises(ApiError, match="history: 2 items; at most 1"):
        parse_request({"history": ["1", "2"], "candidates": ["3"]}, small)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                                  max_size=5), max_leaves=20)
FIELDS = st.sampled_from(["history", "user_id", "ratings", "candidates", "top_n", "system", "explain", "other"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(FIELDS, JSON, max_size=7) | JSON)
def test_generated_bodies_parse_or_get_a_4xx_naming_a_field(value):
    body = json.dumps(value, allow_nan=True).encode()
    try:
        parse_request(read_json(body, LIMITS), LIMITS)
    except ApiError as err:
        assert 400 <= err.status < 500 and err.field and err.message


def test_api_keys_are_hashed_and_checked(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nalpha-key\n\nbeta-key\n")
    keys = ApiKeys.load("keys", str(keys_file))
    assert b"alpha-key" not in b"".join(keys.digests) and len(keys.digests) == 2
    keys.check("Bearer beta-key")
    for header, status in [(None, 401), ("", 401), ("Basic abc", 401), ("Bearer ", 401), ("Bearer gamma", 403)]:
        with pytest.raises(ApiError) as err:
            keys.check(header)
        assert err.value.status == status and "gamma" not in err.value.message
    monkeypatch.setenv("RECALIGN_API_KEYS", "k1, k2")
    ApiKeys.load("keys").check("Bearer k2")
    assert ApiKeys.load("none") is None
    monkeypatch.delenv("RECALIGN_API_KEYS")
    with pytest.raises(UserError, match="auth=none"):
        ApiKeys.load("keys")
    with pytest.raises(UserError, match="no such file"):
        ApiKeys.load("keys", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="'keys' or 'none'"):
        ApiKeys.load("open")
