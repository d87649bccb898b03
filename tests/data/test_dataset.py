"""The canonical dataset: written atomically, skipped when unchanged, read back left-padded."""

import os

import pyarrow.parquet as pq
import pytest

from recalign import io
from recalign.data.dataset import DataConfig, Dataset, prepare
from recalign.data.protocol import ProtocolConfig
from tests.helpers.data import table_source, toy_tables


def test_prepare_writes_atomically_and_skips(tmp_path, monkeypatch):
    inter, items = toy_tables(num_users=5)
    inter_path, items_path = table_source(tmp_path, inter, items)
    cfg = DataConfig(source="table", interactions=str(inter_path), items=str(items_path),
                     protocol=ProtocolConfig(num_candidates=5))
    data_dir = str(tmp_path / "run" / "data")
    calls = {"n": 0}
    real = io.write_parquet

    def failing(table, uri):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real(table, uri)

    monkeypatch.setattr(io, "write_parquet", failing)
    with pytest.raises(OSError):
        prepare(cfg, data_dir)
    assert not os.path.exists(os.path.join(data_dir, "meta.json")), "a failed prepare must not look complete"
    assert not [f for f in os.listdir(data_dir) if f.startswith(".tmp")], "no temp files left behind"
    monkeypatch.setattr(io, "write_parquet", real)
    meta = prepare(cfg, data_dir)
    assert meta["num_users"] == 5
    stamp = os.path.getmtime(os.path.join(data_dir, "examples.parquet"))
    assert prepare(cfg, data_dir)["fingerprint"] == meta["fingerprint"]
    assert os.path.getmtime(os.path.join(data_dir, "examples.parquet")) == stamp, "unchanged config must skip"
    assert pq.read_table(os.path.join(data_dir, "items.parquet")).num_rows == 40
    # a new config whose source cannot be read fails and leaves the dataset as it was
    broken = DataConfig(source="table", interactions=str(tmp_path / "missing.csv"), items=str(items_path))
    with pytest.raises(Exception, match="missing.csv"):
        prepare(broken, data_dir)
    assert Dataset(data_dir).meta["fingerprint"] == meta["fingerprint"]
    split = Dataset(data_dir).split("test")
    assert split.history.shape == (5, 20) and (split.history[:, 0] == 0).all()  # left padded
