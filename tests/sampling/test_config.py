"""SampleConfig: bad values are config errors naming the key."""

import pytest

from recalign.config import ConfigError, load_config
from recalign.sampling.config import SampleConfig


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


def test_cutoff_sets_and_their_users():
    from recalign.sampling.stage import sample_sets

    cfg = load_config(SampleConfig, None, ["num_users=48", "cutoff_users=200", "cutoff_samples=2"])
    sets = sample_sets(cfg)
    assert list(sets) == ["train", "cutoff"]
    assert (sets["train"].num_users, sets["train"].num_samples, sets["train"].split) == (48, 4, "train")
    assert (sets["cutoff"].num_users, sets["cutoff"].num_samples, sets["cutoff"].split) == (200, 2, "cutoff")
    assert sample_sets(load_config(SampleConfig, None, ["num_users=9"]))["cutoff"].num_users == 9, "0 = the same users"
    assert list(sample_sets(load_config(SampleConfig, None, ["cutoff_samples=0"]))) == ["train"]
    with pytest.raises(ConfigError, match="cutoff analyses are set by"):
        load_config(SampleConfig, None, ["split=cutoff"])
    with pytest.raises(ConfigError, match="identical samples"):
        load_config(SampleConfig, None, ["temperature=0", "num_samples=1", "cutoff_samples=2"])
