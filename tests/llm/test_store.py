"""Models on shared storage: published once with a manifest, pulled into a node-local cache checked by size and hash."""

import json
import os

import pytest

from recalign import io
from recalign.errors import MissingInputError, StorageError
from recalign.llm import convert, store


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _folder(path, weights=b"w" * 64):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(weights)
    (path / "sub").mkdir()
    (path / "sub" / "extra.txt").write_text("x")
    return path


def test_a_published_model_is_pulled_once_into_the_node_cache(tmp_path, remote_root, cache, monkeypatch):
    uri = store.publish(_folder(tmp_path / "model"), f"{remote_root}models/m")
    local = store.local_model(uri)
    assert local.startswith(str(cache))
    assert open(os.path.join(local, "model.safetensors"), "rb").read() == b"w" * 64
    assert open(os.path.join(local, "sub", "extra.txt")).read() == "x"
    monkeypatch.setattr(store, "_download", lambda *a: pytest.fail("a matching cached copy is downloaded again"))
    assert store.local_model(uri) == local
    assert store.local_model(str(tmp_path / "model")) == str(tmp_path / "model")  # local paths pass through


def test_a_cached_copy_that_no_longer_matches_is_fetched_again(tmp_path, remote_root, cache):
    uri = store.publish(_folder(tmp_path / "model"), f"{remote_root}models/m")
    local = store.local_model(uri)
    with open(os.path.join(local, "model.safetensors"), "ab") as handle:  # truncated or grown on this node
        handle.write(b"!")
    assert store.local_model(uri) == local
    assert os.path.getsize(os.path.join(local, "model.safetensors")) == 64
    store.publish(_folder(tmp_path / "v2", weights=b"v" * 80), uri)  # a new version of the model at the same URI
    assert open(os.path.join(store.local_model(uri), "model.safetensors"), "rb").read() == b"v" * 80


def test_a_damaged_remote_file_is_refused_and_nothing_is_left_in_the_cache(tmp_path, remote_root, cache):
    uri = store.publish(_folder(tmp_path / "model"), f"{remote_root}models/m")
    io.write_bytes(b"x" * 64, io.join(uri, "model.safetensors"))  # same size, other bytes
    with pytest.raises(StorageError, match="model.safetensors: downloaded 64 bytes with SHA-256"):
        store.local_model(uri)
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_a_folder_without_its_manifest_is_incomplete(tmp_path, remote_root, cache):
    uri = store.publish(_folder(tmp_path / "model"), f"{remote_root}models/m")
    io.delete(io.join(uri, store.MANIFEST))
    with pytest.raises(MissingInputError, match="no complete model there"):
        store.local_model(uri)
    with pytest.raises(MissingInputError, match="_files.json missing"):
        store.fingerprint(uri)


def test_resolve_model_builds_a_named_model_once_and_publishes_it(tmp_path, remote_root, cache, monkeypatch):
    uri = convert.resolve_model("tiny", f"{remote_root}models")
    assert uri == f"{remote_root}models/tiny-llama"
    assert store.published(uri) is not None and io.exists(io.join(uri, "config.json"))
    import recalign.llm.tiny as tiny

    monkeypatch.setattr(tiny, "save_tiny_llama", lambda *a: pytest.fail("a published model is built again"))
    assert convert.resolve_model("tiny", f"{remote_root}models") == uri
    assert store.fingerprint(uri) == store.fingerprint(uri)
    assert not [p for p in cache.iterdir() if p.name.startswith(".build-")]  # the staging copy is gone
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(store.local_model(uri)).model_type == "llama"
