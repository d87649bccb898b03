"""Sampling stage: the callables without a cluster, then the Ray Data pipeline for real on ml-100k users."""

from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow as pa
import pytest

from recalign import io
from recalign.config import ConfigError, load_config
from recalign.prompts import PromptConfig
from recalign.sampling.actors import (SAMPLES_SCHEMA, PromptBuilder, SamplerStage, check_samples, part_files, part_name,
                                      read_samples)
from recalign.sampling.config import SampleConfig
from recalign.sampling.engines import EngineConfig, EngineError
from recalign.sampling.pipeline import run_sampling, select_users
from tests.helpers import fakes as sampling_fakes


def _batch(users=(5, 2, 9)):
    return {"user_idx": np.array(users, dtype=np.int32), "user_id": np.array([f"u{u}" for u in users], dtype=object),
            "split": np.array(["train"] * len(users), dtype=object),
            "prompt": np.array([f"<|im_start|>user\nhistory of {u}\n.\n.\n.<|im_end|>" for u in users], dtype=object)}


def _stage(out_dir, n=4, factory=sampling_fakes.fake_engine):
    return SamplerStage(factory, str(out_dir), num_samples=n, max_new_tokens=8, temperature=0.8, top_p=0.95,
                        model_name="tiny")


# ---------------------------------------------------------------- config and selection

def test_sample_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="num_samples"):
        load_config(SampleConfig, None, ["num_samples=17"])
    with pytest.raises(ConfigError, match="temperature"):
        load_config(SampleConfig, None, ["temperature=-1"])
    with pytest.raises(ConfigError, match="greedy"):
        load_config(SampleConfig, None, ["temperature=0", "num_samples=4"])
    assert load_config(SampleConfig, None, ["temperature=0", "num_samples=1"]).temperature == 0.0
    with pytest.raises(ConfigError, match="split"):
        load_config(SampleConfig, None, ["split=dev"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(SampleConfig, None, ["engine.kv_cache=2"])
    cfg = load_config(SampleConfig, None, ["num_samples=16", "engine.engine=hf", "engine.max_num_seqs=64"])
    assert (cfg.num_samples, cfg.engine.engine, cfg.engine.max_num_seqs) == (16, "hf", 64)


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

def test_sampler_stage_writes_n_rows_per_user_with_the_schema(tmp_path):
    stage = _stage(tmp_path, n=4)
    summary = stage(_batch())
    files = part_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == [part_name([2, 5, 9])]
    assert summary["num_users"].tolist() == [3] and summary["num_rows"].tolist() == [12]
    assert summary["response_tokens"].tolist() == [3 * (3 + 4 + 5 + 6)]
    table = io.read_parquet(files[0])
    assert table.schema.equals(SAMPLES_SCHEMA)
    assert table["user_idx"].to_pylist() == [5] * 4 + [2] * 4 + [9] * 4
    assert table["sample_idx"].to_pylist() == [0, 1, 2, 3] * 3
    assert table["response"].to_pylist()[5] == "analysis 1 of history of 2"
    assert set(table["engine"].to_pylist()) == {"fake"} and set(table["seed"].to_pylist()) == {7}
    assert table["finish_reason"].to_pylist()[:2] == ["length", "stop"]
    check_samples(read_samples(str(tmp_path)), [2, 5, 9], 4)


def test_sampler_stage_rewrites_the_same_file_when_a_batch_is_retried(tmp_path):
    stage = _stage(tmp_path, n=2)
    stage(_batch((5, 2, 9)))
    stage(_batch((9, 5, 2)))  # the same users in another order: same file, not a second copy
    assert len(part_files(str(tmp_path))) == 1
    assert read_samples(str(tmp_path)).num_rows == 6
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_engine_returning_fewer_than_n_completions_fails_loudly(tmp_path):
    stage = _stage(tmp_path, n=4, factory=functools.partial(sampling_fakes.fake_engine, drop=1))
    with pytest.raises(EngineError, match="returned 3 completions for user_idx 5, expected 4"):
        stage(_batch())
    assert part_files(str(tmp_path)) == []


def test_read_samples_deduplicates_and_check_samples_counts(tmp_path):
    _stage(tmp_path, n=3)(_batch((1, 2)))
    _stage(tmp_path, n=3)(_batch((2, 3)))  # user 2 in two files, as after a re-batched retry
    table = read_samples(str(tmp_path))
    assert table.num_rows == 9
    assert list(zip(table["user_idx"].to_pylist(), table["sample_idx"].to_pylist()))[:4] == [
        (1, 0), (1, 1), (1, 2), (2, 0)]
    check_samples(table, [1, 2, 3], 3)
    with pytest.raises(ValueError, match="user_idx 4: 0"):
        check_samples(table, [1, 4], 3)
    with pytest.raises(ValueError, match="user_idx 1: 3"):
        check_samples(table, [1], 4)


def test_prompt_builder_renders_the_users_history(tiny_llama_dir, ml100k_dir):
    from recalign.data.dataset import Dataset

    examples = Dataset(ml100k_dir).examples("train").slice(0, 2)
    batch = {k: np.array(examples[k].to_pylist(), dtype=object) for k in examples.column_names}
    out = PromptBuilder(ml100k_dir, str(tiny_llama_dir), PromptConfig(max_history=5))(batch)
    items = Dataset(ml100k_dir).items
    last_title = items.loc[examples["history"][0].as_py()[-1], "title"]
    assert list(out) == ["user_idx", "user_id", "split", "prompt"]
    assert out["prompt"][0].startswith("<|im_start|>system\n") and out["prompt"][0].endswith("<|im_start|>assistant\n")
    assert "Here are the 5 movies" in out["prompt"][0] and f"5. {last_title}" in out["prompt"][0]
    assert "rated" in out["prompt"][0] and "genres, eras" in out["prompt"][0]


# ---------------------------------------------------------------- the Ray Data pipeline

@pytest.fixture
def fakes_by_value():
    import ray.cloudpickle as cloudpickle

    cloudpickle.register_pickle_by_value(sampling_fakes)
    yield
    cloudpickle.unregister_pickle_by_value(sampling_fakes)


def _cfg(tiny_llama_dir, **kw):
    base = dict(model=str(tiny_llama_dir), num_samples=3, max_new_tokens=6, num_users=6, subset_seed=1,
                batch_size=2, num_actors=2, prompt=PromptConfig(max_history=5))
    base.update(kw)
    return SampleConfig(**base)


@pytest.mark.ray
def test_pipeline_resumes_and_extends_without_duplicates(ray_local, tiny_llama_dir, ml100k_dir, tmp_path,
                                                          fakes_by_value):
    out = str(tmp_path / "samples")
    factory = sampling_fakes.fake_engine
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
def test_pipeline_survives_a_dead_actor_without_duplicating_rows(ray_local, tiny_llama_dir, ml100k_dir, tmp_path,
                                                                 fakes_by_value):
    out, marker = str(tmp_path / "samples"), tmp_path / "crashed"
    # The actor writes its first batch, then its process dies on the second; Ray restarts it and retries.
    factory = functools.partial(sampling_fakes.crashing_engine, str(marker), "exit", 2)
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
    factory = functools.partial(sampling_fakes.crashing_engine, str(marker), "raise", 2)
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
    assert table["prompt_tokens"].to_pylist()[0] > 20 and set(table["seed"].to_pylist()) == {0}


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
