"""The Serve app over real HTTP on a tiny model: keys, limits, every bad body a 4xx JSON error naming a field,
concurrent requests answered as one by one, OpenAPI, and generated requests that never get a 5xx."""

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recalign.rerank.scorer import RerankConfig
from tests.helpers.serve import call


@pytest.mark.ray
def test_rerank_keys_and_documented_api(endpoint):
    status, reply = call(f"{endpoint}/v1/rerank", {"history": ["50", "172"], "candidates": ["1", "2", "3"],
                                                   "top_n": 2})
    assert status == 200, reply
    assert len(reply["ranking"]) == 2 and reply["system"] == "llm:base" and len(reply["request_id"]) == 32
    assert reply["ranking"][0]["score"] >= reply["ranking"][1]["score"] and reply["explanation"] is None
    status, reply = call(f"{endpoint}/v1/rerank", {"user_id": "1", "candidates": ["1", "2"], "explain": True})
    assert status == 200 and isinstance(reply["explanation"], str)

    assert call(f"{endpoint}/v1/rerank", {"history": [], "candidates": ["1"]}, key=None)[0] == 401
    assert call(f"{endpoint}/v1/rerank", {"history": [], "candidates": ["1"]}, key="wrong")[0] == 403
    assert call(f"{endpoint}/v1/systems", key=None)[0] == 401
    status, systems = call(f"{endpoint}/v1/systems")
    assert status == 200 and systems["default"] == "llm:base"
    assert call(f"{endpoint}/healthz", key=None) == (200, {"status": "ok", "system": "llm:base", "generation": 0})
    status, spec = call(f"{endpoint}/openapi.json", key=None)
    assert status == 200 and "/v1/rerank" in spec["paths"]
    assert "candidates" in json.dumps(spec["paths"]["/v1/rerank"]["post"]["requestBody"])
    status, reply = call(f"{endpoint}/v1/rerank", {"history": [], "candidates": ["1"], "system": "sasrec"})
    assert status == 404 and reply["error"]["field"] == "system" and "llm:base" in reply["error"]["message"]


@pytest.mark.ray
@pytest.mark.parametrize("raw, status, field", [
    (b'{"history": ["50"], "candidates": ["nope"]}', 422, "candidates[0]"),
    (b'{"history": ["50"], "ratings": [1e400], "candidates": ["1"]}', 422, "ratings[0]"),
    (b'{"history": ["50"], "ratings": [NaN], "candidates": ["1"]}', 422, "ratings[0]"),
    (b'{"history": ["50"], "ratings": [' + b"9" * 400 + b'], "candidates": ["1"]}', 422, "ratings[0]"),
    (b"[" * 30000, 400, "body"),
    (b"{not json", 400, "body"),
    (b'{"history": ["' + b"x" * 100_000 + b'"], "candidates": ["1"]}', 413, "body"),
    (b'{"user_id": "no-such-user", "candidates": ["1"]}', 404, "user_id"),
])
def test_bad_bodies_get_a_json_4xx_naming_the_field(endpoint, raw, status, field):
    got, reply = call(f"{endpoint}/v1/rerank", raw=raw)
    assert (got, reply.get("error", {}).get("field")) == (status, field), reply
    assert len(json.dumps(reply)) < 600


@pytest.mark.ray
def test_concurrent_requests_are_answered_as_one_by_one(endpoint):
    bodies = [{"history": [str(h) for h in range(1 + i, 6 + i)], "candidates": [str(c) for c in range(20, 24 + i)]}
              for i in range(8)]
    alone = [call(f"{endpoint}/v1/rerank", b) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: call(f"{endpoint}/v1/rerank", b), bodies))
    for (s1, r1), (s2, r2) in zip(alone, together):
        assert s1 == s2 == 200
        assert [r["item_id"] for r in r1["ranking"]] == [r["item_id"] for r in r2["ranking"]]
        assert [r["score"] for r in r1["ranking"]] == pytest.approx([r["score"] for r in r2["ranking"]],
                                                                    rel=1e-3, abs=1e-3)


ITEM = st.sampled_from(["1", "2", "50", "172", "999999", "", "x" * 70]) | st.text(max_size=8)
NUMBER = st.integers(-10, 10) | st.floats(allow_nan=True, allow_infinity=True) | st.integers(10 ** 20, 10 ** 30)
VALUE = st.none() | st.booleans() | NUMBER | ITEM | st.lists(ITEM, max_size=30) | st.lists(NUMBER, max_size=5)
REQUEST = st.fixed_dictionaries({}, optional={
    "history": st.lists(ITEM, max_size=8) | VALUE, "user_id": st.sampled_from(["1", "2", "nobody"]) | VALUE,
    "ratings": st.lists(NUMBER, max_size=8) | VALUE, "candidates": st.lists(ITEM, min_size=1, max_size=28) | VALUE,
    "top_n": NUMBER | VALUE, "system": st.sampled_from(["llm:base", "fusion"]) | VALUE, "explain": VALUE,
    "unknown": VALUE})


def fuzz(endpoint, examples: int):
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(REQUEST)
    def check(body):
        raw = json.dumps(body, allow_nan=True).encode()
        status, reply = call(f"{endpoint}/v1/rerank", raw=raw)
        assert status < 500, (status, reply, raw[:300])
        if status >= 400:
            assert reply["error"]["field"] and reply["error"]["message"], reply
        else:
            assert reply["ranking"], reply

    check()


@pytest.mark.ray
def test_generated_requests_never_get_a_5xx(endpoint):
    fuzz(endpoint, 200)


@pytest.mark.ray
@pytest.mark.slow
def test_two_thousand_generated_requests_never_get_a_5xx(endpoint):
    fuzz(endpoint, 2000)


@pytest.mark.ray
def test_replica_metrics_reach_prometheus(endpoint):
    import time

    import ray

    assert call(f"{endpoint}/v1/rerank", {"history": ["50"], "candidates": ["1", "2"]})[0] == 200
    assert call(f"{endpoint}/v1/rerank", {"history": ["50"], "candidates": ["nope"]})[0] == 422
    port = ray._private.worker._global_node.metrics_export_port
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        if 'status="422"' in text and "ray_recalign_request_seconds_bucket" in text:
            break
        time.sleep(3)
    lines = [line for line in text.splitlines() if line.startswith("ray_recalign_")]
    assert any(line.startswith("ray_recalign_requests_total") and 'status="200"' in line and
               'system="llm:base"' in line for line in lines), lines[:20]
    assert any('status="422"' in line for line in lines), lines[:20]
    assert any(line.startswith("ray_recalign_batch_size_bucket") for line in lines), lines[:20]


@pytest.mark.ray
def test_overload_is_answered_at_once_with_503(endpoint, tiny_llama_dir, ml100k_dir):
    """One replica that takes one request at a time and queues one: of 12 slow requests sent together, the
    ones over the queue get a 503 at once instead of waiting."""
    import time

    from ray import serve

    from serve.app import ServeJob, build

    cfg = ServeJob(run_dir=os.path.dirname(ml100k_dir), model=str(tiny_llama_dir), auth="none",
                   max_ongoing_requests=1, max_queued_requests=1, rerank=RerankConfig(max_new_tokens=64))
    serve.run(build(cfg), name="recalign-overload", route_prefix="/overload")
    try:
        slow = {"history": ["50", "172"], "candidates": ["1", "2", "3"], "explain": True}
        assert call(f"{endpoint}/overload/v1/rerank", slow, key=None)[0] == 200

        def timed(_):
            start = time.perf_counter()
            req = urllib.request.Request(f"{endpoint}/overload/v1/rerank", data=json.dumps(slow).encode())
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    status = resp.status
            except urllib.error.HTTPError as err:
                status = err.code
                assert status != 503 or err.headers.get("Retry-After") == "1", dict(err.headers)
            return status, time.perf_counter() - start

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(timed, range(12)))
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 503} and statuses.count(503) >= 5 and 200 in statuses, results
        slowest_ok = max(t for s, t in results if s == 200)
        assert all(t < slowest_ok for s, t in results if s == 503), results
    finally:
        serve.delete("recalign-overload")


@pytest.mark.ray
def test_serve_config_validates_and_starts(endpoint, tiny_llama_dir, ml100k_dir):
    """serve/config.yaml passes Serve's own schema; its app, built from its args (paths pointed at the test's
    run and model), with its deployment overrides applied, starts and answers."""
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    import serve.app as app_module

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(repo, "serve", "config.yaml")) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    app, = config.applications
    module, _, attr = app.import_path.partition(":")
    assert module == "serve.app" and getattr(app_module, attr) is app_module.app_builder
    args = {**app.args, "run_dir": os.path.dirname(ml100k_dir), "model": str(tiny_llama_dir), "adapter": "",
            "auth": "none"}
    override, = app.deployments
    options = override.model_dump(exclude_unset=True, exclude={"name"})
    assert override.name == app_module.Reranker.name and options["autoscaling_config"]["max_replicas"] >= 2
    options["autoscaling_config"] = {**options["autoscaling_config"], "max_replicas": 1}  # the test's 4 CPUs
    built = app_module.app_builder({k: str(v) for k, v in args.items()})
    built._bound_deployment = built._bound_deployment.options(**options)
    serve.run(built, name="recalign-config", route_prefix="/config")
    try:
        status, reply = call(f"{endpoint}/config/v1/rerank", {"history": ["50"], "candidates": ["1", "2"]}, key=None)
        assert status == 200 and len(reply["ranking"]) == 2
    finally:
        serve.delete("recalign-config")
