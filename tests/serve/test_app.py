"""The Serve app over real HTTP on a tiny model: keys, limits, every bad body a 4xx JSON error naming a field,
concurrent requests answered as one by one, OpenAPI, and generated requests that never get a 5xx."""

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recalign.rerank.scorer import RerankConfig
from tests.helpers import free_ports

KEY = "test-key-0123456789"


def call(url, body=None, key=KEY, raw: bytes | None = None, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"raw": text[:500].decode(errors="replace")}


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_llama_dir, ml100k_dir, tmp_path_factory):
    from ray import serve

    from serve.app import ServeJob, build

    keys_file = tmp_path_factory.mktemp("keys") / "keys"
    keys_file.write_text(KEY + "\n")
    port, = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    try:
        cfg = ServeJob(run_dir=os.path.dirname(ml100k_dir), model=str(tiny_llama_dir), keys_file=str(keys_file),
                       rerank=RerankConfig(max_new_tokens=2))
        serve.run(build(cfg), name="recalign-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


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


@pytest.mark.ray
def test_many_adapters_per_replica_each_scores_as_its_merged_model(endpoint, tiny_llama_dir, tiny_adapters,
                                                                   ml100k_dir):
    """The default adapter resident, another and the base model through an LRU of one (@serve.multiplexed):
    asked in turns, each system's scores are those of its adapter merged into a plain model."""
    import functools

    from ray import serve

    from recalign.data.dataset import Dataset
    from recalign.llm.policy import load_policy
    from recalign.rerank.service import RerankService
    from serve.app import ServeJob, build, run_prompt

    run_dir = os.path.dirname(ml100k_dir)
    cfg = ServeJob(run_dir=run_dir, model=str(tiny_llama_dir), auth="none", adapter=tiny_adapters["a1"],
                   adapters=[tiny_adapters["a2"]], max_adapters=1, rerank=RerankConfig(max_new_tokens=1))
    serve.run(build(cfg), name="recalign-multi", route_prefix="/multi")
    try:
        status, systems = call(f"{endpoint}/multi/v1/systems", key=None)
        assert status == 200 and systems["default"] == "llm:a1"
        assert [s["name"] for s in systems["systems"]] == ["llm:base", "llm:a1", "llm:a2"]
        body = {"history": ["50", "172", "133"], "candidates": ["1", "2", "3", "4", "5"]}
        data = Dataset(ml100k_dir)
        expected = {}
        for system, path in [("llm:a1", tiny_adapters["merged1"]), ("llm:a2", tiny_adapters["merged2"]),
                             ("llm:base", str(tiny_llama_dir))]:
            reference = RerankService(data.items, functools.partial(load_policy, path), cfg.rerank,
                                      run_prompt(run_dir))
            expected[system] = {r["item_id"]: r["score"] for r in reference.rerank([body])[0]["ranking"]}
        assert expected["llm:a1"] != pytest.approx(expected["llm:a2"], abs=1e-3)
        for system in ["llm:a2", None, "llm:base", "llm:a2", "llm:a1"]:
            status, reply = call(f"{endpoint}/multi/v1/rerank", {**body, **({"system": system} if system else {})},
                                 key=None)
            assert status == 200 and reply["system"] == (system or "llm:a1"), reply
            got = {r["item_id"]: r["score"] for r in reply["ranking"]}
            assert got == pytest.approx(expected[reply["system"]], rel=1e-3, abs=1e-3), system
    finally:
        serve.delete("recalign-multi")


@pytest.fixture(scope="module")
def evaluated_run(ml100k_dir, tiny_adapters, tmp_path_factory):
    """A run with ml-100k data, a random SASRec, one finished re-rank policy (llm sft) and the validation results
    its evaluation would write: fusion of SASRec and llm sft at w = 0.5, the best system on validation."""
    import shutil

    from recalign import io
    from recalign.runs import RunSpec, run_stage
    from tests.helpers.recsys import publish_random_sasrec

    root = tmp_path_factory.mktemp("served")
    run = RunSpec(name="served", root=str(root))
    os.makedirs(run.dir())
    os.symlink(ml100k_dir, run.dir("data"))
    publish_random_sasrec(run)
    policy = run.dir("policy", "rerank", "sft")
    run_stage("policy/rerank/sft", policy, "k", lambda: shutil.copytree(tiny_adapters["a1"], policy,
                                                                        dirs_exist_ok=True) and {}, lambda _: None)
    io.write_json({"split": "valid", "rows": 16, "metric": "ndcg@10", "best": "fusion",
                   "systems": {"sasrec": {"ndcg@10": 0.6, "hr@1": 0.4}, "llm zero-shot": {"ndcg@10": 0.2, "hr@1": 0.05},
                               "llm sft": {"ndcg@10": 0.3, "hr@1": 0.1}, "fusion": {"ndcg@10": 0.65, "hr@1": 0.45}},
                   "fusion": {"reranker": "llm sft", "weight": 0.5, "grid": {}}}, run.dir("eval", "validation.json"))
    return run.dir()


def test_the_run_s_systems_and_the_best_by_validation_is_the_default(evaluated_run, tiny_llama_dir):
    from recalign.errors import UserError
    from serve.app import ServeJob, plan_systems

    cfg = ServeJob(run_dir=evaluated_run, model=str(tiny_llama_dir), auth="none")
    systems, default = plan_systems(cfg)
    assert sorted(systems) == ["fusion", "llm:base", "llm:sft", "sasrec"] and default == "fusion"
    assert systems["fusion"]["weight"] == 0.5 and systems["fusion"]["adapter"] == systems["llm:sft"]["adapter"]
    assert systems["llm:base"]["validation"] == {"rows": 16, "ndcg@10": 0.2, "hr@1": 0.05}
    assert plan_systems(ServeJob(run_dir=evaluated_run, system="sasrec"))[1] == "sasrec"
    assert plan_systems(ServeJob(run_dir=evaluated_run, discover=False))[0].keys() == {"llm:base"}
    with pytest.raises(UserError, match="system=nope: this deployment serves"):
        plan_systems(ServeJob(run_dir=evaluated_run, system="nope"))


@pytest.mark.ray
def test_sasrec_and_fusion_are_served_with_their_validation_metrics(endpoint, evaluated_run, tiny_llama_dir):
    from ray import serve

    from serve.app import ServeJob, build

    cfg = ServeJob(run_dir=evaluated_run, model=str(tiny_llama_dir), auth="none", max_adapters=2,
                   rerank=RerankConfig(max_new_tokens=1))
    serve.run(build(cfg), name="recalign-run", route_prefix="/run")
    try:
        status, listed = call(f"{endpoint}/run/v1/systems", key=None)
        assert status == 200 and listed["default"] == "fusion"
        by_name = {s["name"]: s for s in listed["systems"]}
        assert by_name["sasrec"]["validation"]["ndcg@10"] == 0.6 and by_name["sasrec"]["base_model"] is None
        assert by_name["fusion"]["kind"] == "fusion" and by_name["fusion"]["reranker"] == "llm:sft"
        body = {"history": ["50", "172", "133"], "candidates": ["1", "2", "3", "4", "5"]}
        replies = {}
        for system in ["sasrec", "llm:sft", None]:
            status, reply = call(f"{endpoint}/run/v1/rerank", {**body, **({"system": system} if system else {})},
                                 key=None)
            assert status == 200 and reply["system"] == (system or "fusion"), reply
            replies[reply["system"]] = {r["item_id"]: r["score"] for r in reply["ranking"]}
        from recalign.rerank.fusion import fuse

        ids = body["candidates"]
        expected = fuse(np.array([[replies["sasrec"][i] for i in ids]]), np.array([[replies["llm:sft"][i] for i in ids]]),
                        0.5)[0]
        assert [replies["fusion"][i] for i in ids] == pytest.approx(expected.tolist(), abs=1e-3)
    finally:
        serve.delete("recalign-run")


@pytest.mark.ray
def test_a_new_user_config_reloads_the_systems_in_place(endpoint, tiny_llama_dir, tiny_adapters, ml100k_dir):
    """serve.run with a changed user_config reaches the running replica through reconfigure: the new adapter is
    served and the default moves, while the replica (its actor) stays the same."""
    from ray import serve

    from serve.app import ServeJob, build

    cfg = ServeJob(run_dir=os.path.dirname(ml100k_dir), model=str(tiny_llama_dir), auth="none",
                   adapter=tiny_adapters["a1"], rerank=RerankConfig(max_new_tokens=1))
    app = build(cfg)
    serve.run(app, name="recalign-reconf", route_prefix="/reconf")
    try:
        assert call(f"{endpoint}/reconf/healthz", key=None)[1] == {"status": "ok", "system": "llm:a1",
                                                                   "generation": 0}
        replicas = serve.status().applications["recalign-reconf"].deployments["Reranker"].replica_states
        body = {"history": ["50", "172"], "candidates": ["1", "2", "3"]}
        before = call(f"{endpoint}/reconf/v1/rerank", body, key=None)[1]["ranking"]
        changed = app._bound_deployment.options(user_config={"adapter": tiny_adapters["a2"], "adapters": [],
                                                             "system": ""})
        serve.run(changed.bind(*app._bound_deployment.init_args), name="recalign-reconf", route_prefix="/reconf")
        status, health = call(f"{endpoint}/reconf/healthz", key=None)
        assert health == {"status": "ok", "system": "llm:a2", "generation": 1}
        status, listed = call(f"{endpoint}/reconf/v1/systems", key=None)
        assert [s["name"] for s in listed["systems"]] == ["llm:base", "llm:a2"]
        after = call(f"{endpoint}/reconf/v1/rerank", body, key=None)[1]
        assert after["system"] == "llm:a2" and after["ranking"] != before
        assert call(f"{endpoint}/reconf/v1/rerank", {**body, "system": "llm:a1"}, key=None)[0] == 404
        assert serve.status().applications["recalign-reconf"].deployments["Reranker"].replica_states == replicas
    finally:
        serve.delete("recalign-reconf")


@pytest.mark.ray
def test_a_killed_replica_is_replaced_while_clients_retry(endpoint, tiny_llama_dir, ml100k_dir):
    """Two replicas; one is killed while four clients send requests and retry on a 5xx or a dropped connection.
    Every request is answered with the ranking it gets from a healthy deployment, and Serve starts a new replica
    in place of the dead one."""
    import threading
    import time

    import ray
    from ray import serve

    from serve.app import ServeJob, build

    app_name = "recalign-kill"

    def replicas() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{app_name}#")}

    def running() -> int:
        deployment, = serve.status().applications[app_name].deployments.values()
        return deployment.replica_states.get("RUNNING", 0)

    def retrying(body, deadline_s=120.0):
        start, attempts = time.monotonic(), 0
        while True:
            attempts += 1
            try:
                status, reply = call(f"{endpoint}/kill/v1/rerank", body, key=None)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                status, reply = 599, {"raw": repr(err)}
            if status < 500 or time.monotonic() - start > deadline_s:
                return status, reply, attempts
            time.sleep(0.2 * min(attempts, 5))

    cfg = ServeJob(run_dir=os.path.dirname(ml100k_dir), model=str(tiny_llama_dir), auth="none", replicas=2,
                   rerank=RerankConfig(max_new_tokens=2))
    serve.run(build(cfg), name=app_name, route_prefix="/kill")
    try:
        bodies = [{"history": [str(h) for h in range(1 + i, 5 + i)], "candidates": [str(c) for c in range(30, 34)]}
                  for i in range(6)]
        expected = [[r["item_id"] for r in call(f"{endpoint}/kill/v1/rerank", b, key=None)[1]["ranking"]]
                    for b in bodies]
        before = replicas()
        assert len(before) == 2 and running() == 2, before

        stop, answers = threading.Event(), []

        def client(k):
            i = k
            while not stop.is_set():
                status, reply, attempts = retrying(bodies[i % len(bodies)])
                answers.append((i % len(bodies), status, reply, attempts))
                i += 4

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (running() == 2 and replicas() - before):
            time.sleep(1)
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=180)

        after = replicas()
        assert victim not in after and len(after) == 2 and running() == 2, (before, after)
        assert len(answers) >= 8, answers
        for i, status, reply, attempts in answers:
            assert status == 200, (status, reply, attempts)
            assert [r["item_id"] for r in reply["ranking"]] == expected[i]
    finally:
        serve.delete(app_name)
