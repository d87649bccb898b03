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
