"""Sampling stage: the callables without a cluster, then the Ray Data pipeline for real on ml-100k users."""

from __future__ import annotations

import functools
import os

import pyarrow as pa
import pytest

from recalign import io
from recalign.prompts import PromptConfig
from recalign.sampling.actors import check_samples, part_files, read_samples
from recalign.sampling.config import SampleConfig
from recalign.sampling.engines import EngineConfig, batch_seed
from recalign.sampling.pipeline import run_sampling, select_users
from tests.helpers import fakes

# ---------------------------------------------------------------- config and selection


def test_select_users_all_or_nested_seeded_subsets():
    examples = pa.table({"user_idx": pa.array([4, 0, 3, 1, 2, 5], pa.int32()), "x": list("abcdef")})
    assert select_users(examples, 0, 0)["user_idx"].to_pylist() == [0, 1, 2, 3, 4, 5]
    small = select_users(examples, 2, seed=3)["user_idx"].to_pylist()
    large = select_users(examples, 4, seed=3)["user_idx"].to_pylist()
    assert len(small) == 2 and len(large) == 4 and set(small) <= set(large)  # growing a preset extends it
    assert small == sorted(small)
    assert select_users(examples, 4, seed=3)["user_idx"].to_pylist() == large  # deterministic
    assert any(select_users(examples, 3, seed=s)["user_idx"].to_pylist() != select_users(examples, 3, 0)[
        "user_idx"].to_pylist() for s in range(1, 6))
    with pytest.raises(ValueError, match="num_users=7"):
        select_users(examples, 7, 0)


# ---------------------------------------------------------------- the callables, no cluster


# ---------------------------------------------------------------- the Ray Data pipeline


def _cfg(tiny_llama_dir, **kw):
    base = dict(model=str(tiny_llama_dir), num_samples=3, max_new_tokens=6, num_users=6, subset_seed=1,
                batch_size=2, num_actors=2, prompt=PromptConfig(max_history=5))
    base.update(kw)
    return SampleConfig(**base)


@pytest.mark.ray
def test_pipeline_resumes_and_extends_without_duplicates(ray_local, tiny_llama_dir, ml100k_dir, tmp_path,
                                                          fakes_by_value):
    out = str(tmp_path / "samples")
    factory = fakes.fake_engine
    meta = run_sampling(_cfg(tiny_llama_dir, num_users=4), ml100k_dir, out, engine_factory=factory)
    first_files = {f: os.path.getmtime(f) for f in part_files(out)}
    assert meta["num_rows"] == 12 and meta["users_sampled_this_run"] == 4 and len(first_files) == 2

    meta = run_sampling(_cfg(tiny_llama_dir, num_users=4), ml100k_dir, out, engine_factory=factory)
    assert meta["users_sampled_this_run"] == 0  # nothing new: every selected user has N rows
    assert {f: os.path.getmtime(f) for f in part_files(out)} == first_files

    os.remove(sorted(first_files)[0])  # as if the job died before this batch was written
    meta = run_sampling(_cfg(tiny_llama_dir, num_users=6), ml100k_dir, out, engine_factory=factory)
    assert meta["users_sampled_this_run"] == 4  # the lost batch's 2 users + the 2 new ones
    table = read_samples(out)
    selected = select_users(__import__("recalign.data.dataset", fromlist=["Dataset"]).Dataset(ml100k_dir)
                            .examples("train"), 6, 1)["user_idx"].to_pylist()
    assert sorted(set(table["user_idx"].to_pylist())) == selected
    check_samples(table, selected, 3)
    assert table.num_rows == 18

    with pytest.raises(ValueError, match="num_samples changed"):
        run_sampling(_cfg(tiny_llama_dir, num_samples=2), ml100k_dir, out, engine_factory=factory)
    meta = run_sampling(_cfg(tiny_llama_dir, num_samples=2, num_users=2, overwrite=True), ml100k_dir, out,
                        engine_factory=factory)
    assert read_samples(out).num_rows == 4 and meta["num_rows"] == 4


@pytest.mark.ray
@pytest.mark.slow
def test_one_actor_and_two_write_identical_samples(ray_local, tiny_llama_dir, ml100k_dir, tmp_path, fakes_by_value):
    """Which actor draws a batch, and after which others, changes nothing: every batch is reseeded."""
    factory = functools.partial(fakes.fake_engine, noisy=True)
    tables = []
    for actors in (1, 2):
        out = str(tmp_path / f"actors{actors}")
        run_sampling(_cfg(tiny_llama_dir, num_users=6, num_actors=actors), ml100k_dir, out, engine_factory=factory)
        tables.append(read_samples(out).select(["user_idx", "sample_idx", "response", "seed"]))
    assert tables[0].equals(tables[1])
    assert len(set(tables[0]["seed"].to_pylist())) == 3, "three batches of 2 users, a seed each"


@pytest.mark.ray
def test_pipeline_survives_a_dead_actor_without_duplicating_rows(ray_local, tiny_llama_dir, ml100k_dir, tmp_path,
                                                                 fakes_by_value):
    out, marker = str(tmp_path / "samples"), tmp_path / "crashed"
    # The actor writes its first batch, then its process dies on the second; Ray restarts it and retries.
    factory = functools.partial(fakes.crashing_engine, str(marker), "exit", 2)
    meta = run_sampling(_cfg(tiny_llama_dir, num_actors=1), ml100k_dir, out, engine_factory=factory)
    assert marker.exists()
    table = read_samples(out)
    raw_rows = sum(io.read_parquet(f).num_rows for f in part_files(out))
    assert raw_rows == table.num_rows == 18 == meta["num_rows"]  # no duplicate even before deduplication
    check_samples(table, sorted(set(table["user_idx"].to_pylist())), 3)


@pytest.mark.ray
def test_pipeline_engine_error_fails_the_run_and_a_rerun_completes(ray_local, tiny_llama_dir, ml100k_dir, tmp_path,
                                                                   fakes_by_value):
    out, marker = str(tmp_path / "samples"), tmp_path / "raised"
    factory = functools.partial(fakes.crashing_engine, str(marker), "raise", 2)
    with pytest.raises(Exception, match="scripted engine failure"):
        run_sampling(_cfg(tiny_llama_dir, num_actors=1), ml100k_dir, out, engine_factory=factory)
    assert not io.exists(io.join(out, "meta.json"))
    written = read_samples(out).num_rows
    assert written % 3 == 0 and written < 18
    meta = run_sampling(_cfg(tiny_llama_dir, num_actors=1), ml100k_dir, out, engine_factory=factory)
    assert meta["users_sampled_this_run"] == 6 - written // 3
    check_samples(read_samples(out), sorted(set(read_samples(out)["user_idx"].to_pylist())), 3)
    assert read_samples(out).num_rows == 18


@pytest.mark.ray
def test_pipeline_with_the_real_hf_engine(ray_local, tiny_llama_dir, ml100k_dir, tmp_path):
    out = str(tmp_path / "samples")
    cfg = _cfg(tiny_llama_dir, num_samples=4, num_users=3, batch_size=2, num_actors=1,
               engine=EngineConfig(engine="hf", threads=1))
    meta = run_sampling(cfg, ml100k_dir, out)
    table = read_samples(out)
    assert meta["engines"] == ["hf"] and table.num_rows == 12
    check_samples(table, meta and sorted(set(table["user_idx"].to_pylist())), 4)
    assert set(table["finish_reason"].to_pylist()) <= {"stop", "length"}
    assert all(1 <= t <= 6 for t in table["response_tokens"].to_pylist())
    assert len(set(table["response"].to_pylist())) > 3  # sampled, not N copies of one greedy answer
    assert table["prompt_tokens"].to_pylist()[0] > 20
    users = sorted(set(table["user_idx"].to_pylist()))
    assert set(table["seed"].to_pylist()) == {batch_seed(0, users[:2], "train"), batch_seed(0, users[2:], "train")}


@pytest.mark.ray
def test_pipeline_with_the_real_vllm_engine_keeps_all_n_samples(ray_local, tiny_llama_dir, ml100k_dir, tmp_path):
    out = str(tmp_path / "samples")
    cfg = _cfg(tiny_llama_dir, num_samples=4, num_users=3, batch_size=3, num_actors=1,
               engine=EngineConfig(engine="vllm", enforce_eager=True, kv_cache_gb=0.25, max_model_len=1024))
    meta = run_sampling(cfg, ml100k_dir, out)
    table = read_samples(out)
    assert meta["engines"] == ["vllm"] and table.num_rows == 12  # Ray's own vLLM stage would give 3
    check_samples(table, sorted(set(table["user_idx"].to_pylist())), 4)
    assert all(1 <= t <= 6 for t in table["response_tokens"].to_pylist())
    assert len(set(table["response"].to_pylist())) > 3
