"""The sampling stage when sampler actors die for good reasons and bad: a worker node of a real multi-node Ray
cluster lost under an actor mid-batch (the batch is redone once, every user gets exactly N rows), and an actor
that dies on every batch (the job fails once its restarts are spent, instead of looping)."""

import os

import pytest

from recalign.prompts import PromptConfig
from recalign.sampling.config import SampleConfig
from recalign.sampling.pipeline import run_sampling
from tests.helpers.cluster import run_scenario
from tests.helpers.fakes import FakeEngine

pytestmark = pytest.mark.ray


@pytest.mark.slow
def test_a_node_lost_under_an_actor_still_gives_exactly_n_rows_per_user(tiny_data_dir, tiny_llama_dir, tmp_path):
    """tests/helpers/cluster.py `sample`: 24 users in batches of 2 over 2 sampler actors on 2 nodes; the worker
    node of one is killed inside its first batch. Until the head declares the node dead (~15 s) every retry of
    that batch fails at once: a bounded retry count (the former max_task_retries=max_actor_restarts) fails the
    run with ActorUnavailableError."""
    n = 3
    result = run_scenario("sample", str(tmp_path / "sample"), "--data", tiny_data_dir, "--model", str(tiny_llama_dir),
                          "--num-samples", str(n), "--retries", "3")
    assert not result["errors"] and "run_error" not in result, result
    storage = result["storage"]  # what a job checks when it joins this cluster
    assert storage["nodes"] == 3 and storage["relative"].startswith(
        "run.root=runs: a relative path on a 3-node Ray cluster is each node's own disk"), storage
    assert storage["probe_left"] == [], "the probe files of the driver and of every node are removed"
    removed, batches = result["removed"], result["batches"]
    before = [b for b in batches if b["time"] < result["removed_at"]]
    assert len({b["node"] for b in before}) == 2 and removed in {b["node"] for b in before}, "an actor on each node"
    assert [b["call"] for b in batches if b["node"] == removed] == [0], "removed inside its first batch"
    restarted = {b["pid"] for b in batches} - {b["pid"] for b in before}
    assert restarted and removed not in {b["node"] for b in batches if b["pid"] in restarted}, "restarted elsewhere"
    users = result["users"]
    assert len(batches) == -(-len(users) // result["batch_size"]) + 1, "the lost batch drawn again, once"
    assert result["samples_per_user"] == {str(u): n for u in users}
    assert result["raw_rows"] == result["rows"] == result["meta"]["num_rows"] == n * len(users), "no duplicate rows"


class _DiesOnEveryBatch(FakeEngine):
    def generate(self, prompts, n, max_new_tokens, temperature, top_p):
        os._exit(1)


def _dies_on_every_batch() -> FakeEngine:
    return _DiesOnEveryBatch()


def test_an_actor_that_dies_on_every_batch_fails_the_job_after_its_restarts(ray_local, tiny_data_dir,
                                                                            tiny_llama_dir, tmp_path):
    """Batches are retried without a count (node loss needs it), so max_actor_restarts alone ends the loop."""
    import ray

    cfg = SampleConfig(model=str(tiny_llama_dir), num_samples=2, max_new_tokens=4, num_users=4, batch_size=2,
                       num_actors=1, max_actor_restarts=2, prompt=PromptConfig(max_history=5))
    with pytest.raises(ray.exceptions.ActorDiedError):
        run_sampling(cfg, tiny_data_dir, str(tmp_path / "samples"), engine_factory=_dies_on_every_batch,
                     log=lambda _: None)
