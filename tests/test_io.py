"""Atomic storage writes and the config loader."""

import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recalign import io
from recalign.config import ConfigError, fingerprint, load_config


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


@dataclass
class Inner:
    lr: float = 1e-3
    layers: list[int] = field(default_factory=lambda: [1, 2])
    mode: str = "a"


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, path, ["inner.layers=[3, 4]", "flag=true", "name=run1"])
    assert cfg == Outer(name="run1", steps=20, flag=True, inner=Inner(lr=0.5, layers=[3, 4]))
    assert load_config(Outer).steps == 10
    assert fingerprint(cfg) != fingerprint(Outer()) and fingerprint(cfg) == fingerprint(load_config(
        Outer, path, ["inner.layers=[3, 4]", "flag=true", "name=run1"]))


@pytest.mark.parametrize("overrides, pattern", [
    (["inner.lrr=1"], r"unknown key\(s\) inner\.lrr for Inner"),
    (["steps=ten"], r"steps: expected an integer, got 'ten'"),
    (["flag=1"], r"flag: expected true/false"),
    (["inner.layers=3"], r"inner\.layers: expected a list"),
    (["noequals"], r"expected key=value"),
])
def test_bad_overrides(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(Outer, None, overrides)


def test_bad_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key\(s\) stepz"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")


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
