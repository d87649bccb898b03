"""Run storage on any pyarrow filesystem: atomic writes, reads that name what is missing, local copies."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recalign import io


def test_write_parquet_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "t.parquet"
    io.write_parquet(pa.table({"a": [1, 2]}), target)

    def broken(table, where, filesystem=None):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half")
        raise OSError("killed mid-write")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError):
        io.write_parquet(pa.table({"a": [3]}), target)
    assert os.listdir(tmp_path) == ["t.parquet"]
    monkeypatch.undo()
    assert io.read_parquet(target)["a"].to_pylist() == [1, 2], "the old file is intact"


def test_json_roundtrip_and_missing(tmp_path):
    io.write_json({"x": 1}, tmp_path / "a" / "b.json")
    assert io.read_json(tmp_path / "a" / "b.json") == {"x": 1}
    with pytest.raises(FileNotFoundError, match="no such table"):
        io.read_parquet(tmp_path / "nope.parquet")


def test_local_copy_of_a_remote_directory_is_temporary(remote_root, tmp_path):
    io.write_json({"a": 1}, remote_root + "adapters/sft/adapter_config.json")
    io.write_bytes(b"weights", remote_root + "adapters/sft/adapter_model.safetensors")
    assert not io.is_local(remote_root + "adapters/sft") and io.is_local(tmp_path)
    with io.local_copy(remote_root + "adapters/sft") as local:
        assert sorted(os.listdir(local)) == ["adapter_config.json", "adapter_model.safetensors"]
        assert open(os.path.join(local, "adapter_model.safetensors"), "rb").read() == b"weights"
    assert not os.path.exists(local)
    with io.local_copy(tmp_path) as same:  # a local directory is used in place
        assert same == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="mem://adapters/none: no such directory"):
        with io.local_copy(remote_root + "adapters/none"):
            pass
    with pytest.raises(ValueError, match="stage the files locally"):
        io.local_path(remote_root + "adapters/sft")
