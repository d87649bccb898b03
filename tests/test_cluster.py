"""What a job checks when it joins a cluster: shared storage, and which library it ships (recalign.cluster)."""

import json
import os

import pytest

from recalign import cluster
from recalign.errors import ClusterError

TWO_NODES = [{"NodeID": "a" * 16, "NodeManagerAddress": "10.0.0.1"}, {"NodeID": "b" * 16, "NodeManagerAddress": "x"}]


def test_a_relative_path_on_a_multi_node_cluster_is_an_error_naming_the_key():
    with pytest.raises(ClusterError, match=r"run.root=runs: a relative path on a 2-node Ray cluster .* s3://"):
        cluster.check_storage({"run.root": "runs"}, TWO_NODES)
    with pytest.raises(ClusterError, match=r"^models_dir=models: "):
        cluster.check_storage({"run.root": "s3://b/r", "models_dir": "models"}, TWO_NODES[:1] * 2)


def test_a_relative_path_in_a_submitted_jobs_temporary_working_dir_is_an_error(monkeypatch, tmp_path):
    cwd = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_abc"
    cluster.check_storage({"run.root": "runs"}, TWO_NODES[:1], cwd=cwd)  # not a submitted job: fine
    monkeypatch.setenv(cluster.JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))
    with pytest.raises(ClusterError, match="run.root=runs: relative to this job's working dir"):
        cluster.check_storage({"run.root": "runs"}, TWO_NODES[:1], cwd=cwd)
    cluster.check_storage({"run.root": str(tmp_path)}, TWO_NODES[:1], cwd=cwd)  # absolute: kept
    cluster.check_storage({"run.root": "runs"}, TWO_NODES[:1], cwd=str(tmp_path))  # a checkout on the head: fine


def test_the_job_ships_the_library_its_driver_imported(monkeypatch):
    env, override = cluster.shipped_runtime_env()
    assert env == {"py_modules": [cluster.package_dir()]} and not override
    assert os.path.isfile(os.path.join(cluster.package_dir(), "cluster.py"))
    monkeypatch.setenv(cluster.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"py_modules": ["gcs://_ray_pkg_x.zip"]}}))
    env, override = cluster.shipped_runtime_env()
    assert env == {"py_modules": [cluster.package_dir(), "gcs://_ray_pkg_x.zip"]} and override


def test_a_submitted_driver_that_imported_another_copy_is_an_error(monkeypatch, tmp_path):
    (tmp_path / "platform" / "recalign").mkdir(parents=True)
    cluster.check_driver_code(str(tmp_path))  # not a submitted job
    monkeypatch.setenv(cluster.JOB_CONFIG_ENV, "{}")
    with pytest.raises(ClusterError, match=r"imported recalign from .*sh jobs/run"):
        cluster.check_driver_code(str(tmp_path))
    cluster.check_driver_code(os.path.dirname(os.path.dirname(cluster.package_dir())))  # its own copy: fine
