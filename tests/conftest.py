"""Shared fixtures. Ray is started only by tests that ask for `ray_local` (one per session)."""

from __future__ import annotations

import os

import launch  # noqa: F401  (sets Ray's loopback environment before any test imports ray)
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """An embedded local Ray on 127.0.0.1 for the whole session, files under a temp dir."""
    from launch import RayConfig, ray_session

    # Ray workers unpickle test functions by module name: give them the same import path.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [repo] + [os.path.join(repo, p) for p in ("platform", "jobs")]
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([saved] if saved else []))
    try:
        with ray_session(RayConfig(num_cpus=4, object_store_mb=512)):
            yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer saved as a Hugging Face folder."""
    from recalign.llm.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """The tiny clustered dataset (tests.helpers.data.tiny_data_config), prepared once per session; read-only."""
    from tests.helpers.data import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def pairs_uris(ml100k_dir, tiny_llama_dir, tmp_path_factory):
    """Heuristic knowledge and re-rank pairs of 6 ml-100k users, K=3, rendered for the tiny Llama."""
    from tests.helpers.pairs import write_pairs

    return write_pairs(ml100k_dir, str(tiny_llama_dir), str(tmp_path_factory.mktemp("pairs")), num_users=6)


@pytest.fixture
def fakes_by_value():
    """The scripted engines of tests.helpers.fakes pickled by value, so Ray workers need not import them."""
    import ray.cloudpickle as cloudpickle

    from tests.helpers import fakes

    cloudpickle.register_pickle_by_value(fakes)
    yield
    cloudpickle.unregister_pickle_by_value(fakes)


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory):
    """ml-100k prepared once per session with the default protocol."""
    from recalign.data.dataset import DataConfig, prepare

    data_dir = str(tmp_path_factory.mktemp("ml100k") / "data")
    prepare(DataConfig(), data_dir)
    return data_dir


@pytest.fixture
def remote_root(tmp_path, monkeypatch):
    """A `mem://` URI root served by a non-local pyarrow filesystem (a SubTreeFileSystem over a temp
    dir), standing in for s3:// or gs://: code that opens such URIs with plain file paths fails on it."""
    import pyarrow.fs as pafs

    from recalign import io

    base = tmp_path / "remote"
    base.mkdir()
    real = io.resolve

    def resolve(uri):
        if str(uri).startswith("mem://"):
            return pafs.SubTreeFileSystem(str(base), pafs.LocalFileSystem()), str(uri)[len("mem://"):]
        return real(uri)

    monkeypatch.setattr(io, "resolve", resolve)
    return "mem://"


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama_dir, tmp_path_factory):
    """Two LoRA adapters on the tiny Llama with weights large enough to change its greedy answers,
    and each one merged into a plain model folder (the reference)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.3)
        model.save_pretrained(str(root / f"a{seed}"))
        model.merge_and_unload().save_pretrained(str(root / f"merged{seed}"))
        AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(str(root / f"merged{seed}"))
        out[f"a{seed}"] = str(root / f"a{seed}")
        out[f"merged{seed}"] = str(root / f"merged{seed}")
    return out


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_llama_dir, ml100k_dir, tmp_path_factory):
    """The Serve app on the tiny Llama behind the test key (tests.helpers.serve.KEY), over HTTP on a free port of
    127.0.0.1; one per test module."""
    from ray import serve

    from recalign.rerank.scorer import RerankConfig
    from serve.app import ServeJob, build
    from tests.helpers import free_ports
    from tests.helpers.serve import KEY

    keys_file = tmp_path_factory.mktemp("keys") / "keys"
    keys_file.write_text(KEY + "\n")
    port, = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    try:
        cfg = ServeJob(run_dir=os.path.dirname(ml100k_dir), model=str(tiny_llama_dir), keys_file=str(keys_file),
                       rerank=RerankConfig(max_new_tokens=2))
        serve.run(build(cfg), name="recalign-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
