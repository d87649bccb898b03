"""jobs/sample.py end to end: config, data preparation, the Ray Data pipeline, the written samples."""

from __future__ import annotations

import os

import pytest

from recalign.config import load_config
from recalign.sampling.actors import check_samples, read_samples
from tests.helpers import REPO


def test_shipped_sample_yaml_loads():
    import sample

    cfg = load_config(sample.SampleJob, os.path.join(REPO, "jobs", "configs", "sample.yaml"), ["sample.num_samples=16"])
    assert cfg.sample.num_samples == 16 and cfg.sample.model == "smollm2" and cfg.sample.split == "train"


@pytest.mark.ray
def test_sample_job_on_ml100k_with_the_tiny_model(ray_local, tiny_llama_dir, tmp_path):
    import sample

    metas = sample.main([f"run.root={tmp_path}", "run.name=job", f"sample.model={tiny_llama_dir}",
                         "sample.num_users=5", "sample.num_samples=2", "sample.max_new_tokens=4", "sample.batch_size=3",
                         "sample.cutoff_users=7", "sample.engine.engine=hf"])
    table = read_samples(str(tmp_path / "job" / "samples" / "train"))
    assert os.path.isfile(tmp_path / "job" / "data" / "meta.json")  # the job prepared the data itself
    assert metas["train"]["num_rows"] == table.num_rows == 10 and metas["train"]["num_users"] == 5
    check_samples(table, sorted(set(table["user_idx"].to_pylist())), 2)
    assert set(table["split"].to_pylist()) == {"train"}
    cutoff = read_samples(str(tmp_path / "job" / "samples" / "cutoff"))
    assert set(cutoff["split"].to_pylist()) == {"cutoff"} and cutoff.num_rows == 7, "one analysis each, 7 users"
    assert set(table["user_idx"].to_pylist()) <= set(cutoff["user_idx"].to_pylist()), "one permutation: nested"


@pytest.mark.slow
@pytest.mark.ray
def test_sample_job_with_smollm2_and_vllm_writes_english(ray_local, tmp_path):
    import sample

    meta = sample.main([f"run.root={tmp_path}", "run.name=smol", f"sample.models_dir={REPO}/models",
                        "sample.num_users=4", "sample.num_samples=4", "sample.max_new_tokens=40",
                        "sample.engine.engine=vllm", "sample.engine.enforce_eager=true"])["train"]
    table = read_samples(str(tmp_path / "smol" / "samples" / "train"))
    check_samples(table, sorted(set(table["user_idx"].to_pylist())), 4)
    assert meta["engines"] == ["vllm"] and table.num_rows == 16
    words = " ".join(table["response"].to_pylist()).lower().split()
    assert sum(w in {"the", "and", "of", "movies", "user", "their"} for w in words) > 20  # English, not noise
