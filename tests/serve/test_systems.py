"""The Serve app's systems over real HTTP on a tiny model: many adapters per replica, the run's systems and the
best by validation the default, SASRec and fusion, a new user_config reloaded in place, and a replica killed
while clients retry."""

import os
import urllib.error

import numpy as np
import pytest

from recalign.rerank.scorer import RerankConfig
from tests.helpers.serve import call


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
@pytest.mark.slow
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
        def replaced(deadline_s: float) -> bool:
            deadline = time.monotonic() + deadline_s
            while time.monotonic() < deadline:
                if running() == 2 and victim not in replicas() and replicas() - before:
                    return True
                time.sleep(1)
            return False

        # The clients keep sending while Serve starts the new replica; on a loaded 2-core CI machine a replica can
        # take minutes to load, so the check waits again once the clients have stopped before it says it failed.
        replaced(180)
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        ok = replaced(300)

        after = replicas()
        deployment, = serve.status().applications[app_name].deployments.values()
        assert ok and len(after) == 2, (before, after, deployment.status, deployment.replica_states, deployment.message)
        assert len(answers) >= 8, answers
        for i, status, reply, attempts in answers:
            assert status == 200, (status, reply, attempts)
            assert [r["item_id"] for r in reply["ranking"]] == expected[i]
    finally:
        serve.delete(app_name)
