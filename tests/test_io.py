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


@pytest.mark.parametrize("where", ["local", "remote"])
def test_replace_dir_puts_exactly_the_new_files_in_place(tmp_path, remote_root, where):
    base = str(tmp_path / "out") if where == "local" else f"{remote_root}out"
    for version, names in ((1, ["a.txt", "old.txt"]), (2, ["a.txt", "sub/b.txt"])):
        src = tmp_path / f"v{version}"
        for name in names:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(f"{version}")
        io.replace_dir(str(src), io.join(base, "folder"))
    assert io.read_text(io.join(base, "folder", "a.txt")) == "2"
    assert io.read_text(io.join(base, "folder", "sub", "b.txt")) == "2"
    assert not io.exists(io.join(base, "folder", "old.txt"))
