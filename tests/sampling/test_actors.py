"""The sampling stage's Ray Data callables, called with dict batches and no cluster."""

import functools
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from recalign import io
from recalign.prompts import PromptConfig
from recalign.sampling.actors import (SAMPLES_SCHEMA, PromptBuilder, SamplerStage, check_samples, part_files, part_name,
                                      read_samples)
from recalign.sampling.engines import EngineConfig, EngineError, HFEngine, batch_seed
from tests.helpers import fakes


def _batch(users=(5, 2, 9)):
    return {"user_idx": np.array(users, dtype=np.int32), "user_id": np.array([f"u{u}" for u in users], dtype=object),
            "split": np.array(["train"] * len(users), dtype=object),
            "prompt": np.array([f"<|im_start|>user\nhistory of {u}\n.\n.\n.<|im_end|>" for u in users], dtype=object)}


def _stage(out_dir, n=4, factory=fakes.fake_engine):
    return SamplerStage(factory, str(out_dir), num_samples=n, max_new_tokens=8, temperature=0.8, top_p=0.95,
                        model_name="tiny")


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
    assert set(table["engine"].to_pylist()) == {"fake"}
    assert set(table["seed"].to_pylist()) == {batch_seed(0, [2, 5, 9], "train")}, "the batch's seed, recorded"
    assert table["finish_reason"].to_pylist()[:2] == ["length", "stop"]
    check_samples(read_samples(str(tmp_path)), [2, 5, 9], 4)


def test_sampler_stage_rewrites_the_same_file_when_a_batch_is_retried(tmp_path):
    stage = _stage(tmp_path, n=2)
    stage(_batch((5, 2, 9)))
    stage(_batch((9, 5, 2)))  # the same users in another order: same file, not a second copy
    assert len(part_files(str(tmp_path))) == 1
    assert read_samples(str(tmp_path)).num_rows == 6
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_batch_seed_depends_on_the_seed_the_set_and_the_users_not_their_order():
    assert batch_seed(0, [5, 2, 9], "train") == batch_seed(0, [9, 5, 2], "train")
    assert len({batch_seed(0, [2, 5, 9], "train"), batch_seed(1, [2, 5, 9], "train"),
                batch_seed(0, [2, 5, 9], "cutoff"), batch_seed(0, [2, 5], "train")}) == 4
    assert all(0 <= batch_seed(s, [s], "train") < 2**31 for s in range(50))


@pytest.mark.parametrize("engine", ["fake", "hf"])
def test_a_batchs_samples_do_not_depend_on_the_batches_drawn_before_it(tmp_path, tiny_llama_dir, engine):
    """Each batch is drawn under its own seed: batch B on a fresh actor equals batch B after batch A on
    another, whose engine stream had moved on (with the transformers engine on a tiny model, for real)."""
    if engine == "fake":
        factory = functools.partial(fakes.fake_engine, noisy=True)
    else:
        factory = functools.partial(HFEngine, str(tiny_llama_dir), 3, EngineConfig(engine="hf", threads=1))
    later, fresh = tmp_path / "later", tmp_path / "fresh"
    busy = _stage(later, n=3, factory=factory)
    busy(_batch((1, 4)))
    busy(_batch((5, 2, 9)))
    _stage(fresh, n=3, factory=factory)(_batch((5, 2, 9)))
    want = read_samples(str(fresh)).filter(pc.is_in(read_samples(str(fresh))["user_idx"], pa.array([2, 5, 9])))
    got = read_samples(str(later))
    got = got.filter(pc.is_in(got["user_idx"], pa.array([2, 5, 9])))
    assert got["response"].to_pylist() == want["response"].to_pylist()
    assert len(set(got["response"].to_pylist())) == got.num_rows, "the draws differ within a batch"
    other = _stage(tmp_path / "other", n=3, factory=factory)
    other.seed = 1
    other(_batch((5, 2, 9)))
    assert read_samples(str(tmp_path / "other"))["response"].to_pylist() != want["response"].to_pylist(), \
        "another sample.seed draws other samples"


def test_engine_returning_fewer_than_n_completions_fails_loudly(tmp_path):
    stage = _stage(tmp_path, n=4, factory=functools.partial(fakes.fake_engine, drop=1))
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
