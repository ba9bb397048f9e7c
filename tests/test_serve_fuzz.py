"""Malformed and hostile request bodies at random (hypothesis), over real HTTP on 127.0.0.1, to every
endpoint of the Serve app serving the session's tiny run: never a 5xx, every 4xx a JSON answer
naming the field (422) or the limit (413), and the app still answers a valid request afterwards.

The app is started once for this module from conftest's ``tiny_run`` (test_serve.py's module
fixture re-scores a copy of the run first, which these tests do not need; Serve is shut down
between the two modules, so only one instance runs at a time)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reasonrec.config import load_config

SERVE = [
    "serve.ingress_cpus=0.05",
    "serve.planner_cpus=0.05",
    "serve.tool_cpus=0.05",
    "serve.vlm_cpus=0.1",
    "serve.ingress_replicas=[1,1]",
    "serve.planner_replicas=[1,1]",
    "serve.tool_replicas=[1,1]",
    "serve.vlm_replicas=[1,1]",
    "serve.max_history=50",
    "serve.max_candidates=120",
    "serve.max_items_ctr=8",
    "serve.max_body_bytes=262144",
]
POSTS = ("/v1/recommend", "/v1/ctr", "/v1/explain")
OTHERS = ("/healthz", "/readyz", "/nope")  # wrong method / unknown path: 405 / 404
VALID = {
    "/v1/recommend": {"user_id": 1, "k": 3},
    "/v1/ctr": {"user_id": 1, "items": [1, 2]},
    "/v1/explain": {"user_id": 1, "item_id": 2},
}
INT_FIELDS = ("user_id", "item_id", "query_id", "k")
LIST_FIELDS = ("history", "candidates", "items")
FIELDS = INT_FIELDS + LIST_FIELDS + ("rating", "unknown_field", "")


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    import socket

    from ray import serve

    from ray_jobs.serve import start
    from reasonrec.config import to_yaml

    run_cfg, _ = tiny_run
    preset = tmp_path_factory.mktemp("serve-fuzz") / "run.yaml"
    preset.write_text(to_yaml(run_cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(preset, [*SERVE, f"serve.port={port}"])
    assert Path(cfg.output_root).is_absolute()
    url = start(cfg)
    yield url, cfg
    serve.shutdown()


# ------------------------------------------------------------------------------ strategies
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["\ud800", "\udfff", "\x00", "1", "NaN"])
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=25,
)
hostile_numbers = (
    st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            2**63,
            -(2**63) - 1,
            2**64,
            10**300,
            -(10**300),
            1e308,
            -1e308,
            -0.0,
            5e-324,
            -1,
            1.5,
            10**4299,
        ]
    )
    | st.integers(min_value=2**63)
    | st.integers(max_value=-(2**63) - 1)
    | st.floats()
)
not_an_int = json_values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool)) | hostile_numbers
hostile_lists = (
    st.lists(not_an_int, min_size=1, max_size=5)
    | st.lists(st.integers(), min_size=200, max_size=400)
    | st.integers(1, 300).map(lambda n: json.loads("[" * n + "]" * n))
    | not_an_int
)
bad_rating = (
    st.floats(max_value=-1e-9)
    | st.sampled_from([math.nan, math.inf, -math.inf])
    | st.text(max_size=5)
    | json_values.filter(lambda v: not isinstance(v, (int, float)) or isinstance(v, bool))
)


@st.composite
def mutated(draw, path: str) -> dict:
    """A valid body of ``path`` with one or more fields made hostile (or an unknown one added)."""
    body = dict(VALID.get(path, {"user_id": 1}))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS))
        value = draw(
            not_an_int
            if field in INT_FIELDS
            else hostile_lists
            if field in LIST_FIELDS
            else bad_rating
            if field == "rating"
            else json_values
        )
        body[field] = value
    return body


def _encode(value) -> bytes:
    # Python's json writes NaN / Infinity (and lone surrogates, escaped) as JavaScript would.
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def raw_bodies(draw, path: str) -> bytes:
    kind = draw(
        st.sampled_from(
            ["mutated", "mutated", "mutated", "json", "bytes", "corrupt", "truncated", "deep", "big_number", "huge"]
        )
    )
    if kind == "mutated":
        return _encode(draw(mutated(path)))
    if kind == "json":
        return _encode(draw(json_values))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        n = draw(st.integers(500, 60_000))
        return (b'{"user_id": 1, "history": ' + b"[" * n + b"]" * n + b"}") if draw(st.booleans()) else b"[" * n
    if kind == "big_number":
        digits = draw(st.integers(19, 6000))
        return b'{"user_id": ' + draw(st.sampled_from([b"", b"-"])) + b"9" * digits + b', "item_id": 1, "k": 1}'
    if kind == "huge":  # over serve.max_body_bytes: 413 before it is read
        return b'{"history": [' + b"1, " * 100_000 + b"1]}"
    blob = _encode(draw(mutated(path)))
    if kind == "truncated":
        return blob[: draw(st.integers(0, max(0, len(blob) - 1)))]
    at = draw(st.integers(0, len(blob)))  # invalid UTF-8 spliced in
    return (
        blob[:at]
        + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xfe\xfe"]))
        + blob[at:]
    )


@st.composite
def requests_(draw):
    path = draw(st.sampled_from(POSTS + POSTS + POSTS + OTHERS))
    ctype = draw(
        st.sampled_from(
            [
                "application/json",
                "application/json",
                "application/json; charset=utf-8",
                "text/plain",
                None,
                "application/x-www-form-urlencoded",
            ]
        )
    )
    return path, draw(raw_bodies(path)), ctype


# ------------------------------------------------------------------------------ tests
def _check(r: requests.Response, path: str) -> None:
    assert r.status_code < 500, (path, r.status_code, r.text[:500])
    if r.status_code >= 400:
        detail = r.json()["detail"]  # JSON, naming what is wrong
        if r.status_code == 422:
            assert detail and all(isinstance(e["loc"], list) and e["loc"] and e["msg"] for e in detail), detail
        elif r.status_code == 413:
            assert "serve.max_" in detail, detail


STATS: dict[int, int] = {}


@settings(
    max_examples=220,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
@given(req=requests_())
def test_no_body_makes_a_server_error(served, req):
    url, _ = served
    path, body, ctype = req
    headers = {"content-type": ctype} if ctype else {}
    r = requests.post(url + path, data=body, headers=headers, timeout=120)
    STATS[r.status_code] = STATS.get(r.status_code, 0) + 1
    _check(r, path)


def test_the_app_is_alive_after_the_fuzzing(served):
    url, _ = served
    if not STATS:
        pytest.skip("checks the app after test_no_body_makes_a_server_error: run the module")
    print("fuzz status codes:", dict(sorted(STATS.items())))
    assert sum(STATS.values()) >= 200, STATS  # the fuzz test ran before this one, in full
    assert {413, 422} <= set(STATS), STATS
    assert requests.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
    for path, body in VALID.items():
        r = requests.post(url + path, json=body, timeout=120)
        assert r.status_code == 200, (path, r.text)


def test_nan_and_huge_bodies_on_explain(served):
    url, cfg = served
    for body, field in [
        ('{"user_id": 1, "item_id": 2, "rating": NaN}', "rating"),
        ('{"user_id": NaN, "item_id": 2}', "user_id"),
        ('{"user_id": 1, "item_id": -Infinity}', "item_id"),
    ]:
        r = requests.post(url + "/v1/explain", data=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 422 and any(field in e["loc"] for e in r.json()["detail"]), r.text
    t0 = time.perf_counter()
    r = requests.post(
        url + "/v1/explain",
        data=b" " * (cfg.serve.max_body_bytes + 1),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and "serve.max_body_bytes" in r.json()["detail"], r.text
    assert time.perf_counter() - t0 < 30
