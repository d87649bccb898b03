"""Shared fixtures. Ray is started only by tests that ask for `ray_local` (one per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """An embedded local Ray on 127.0.0.1 for the whole session, files under a temp dir."""
    from launch import RayConfig, ray_session

    with ray_session(RayConfig(num_cpus=4, object_store_mb=512)):
        yield


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer saved as a Hugging Face folder."""
    from tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory):
    """ml-100k prepared once per session with the default protocol."""
    from recalign.data.dataset import DataConfig, prepare

    data_dir = str(tmp_path_factory.mktemp("ml100k") / "data")
    prepare(DataConfig(), data_dir)
    return data_dir
