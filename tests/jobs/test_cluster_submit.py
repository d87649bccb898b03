"""The same jobs run on a Ray cluster: start a head with `ray start`, submit with `ray job submit`."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, free_ports
from tests.helpers.ray_head import ray_cmd, ray_head


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head of our own (`ray start --head --block`), as a fresh clone without an activated venv sees it:
    the project's interpreter is not on PATH, so a bare `python` in an entrypoint would be another one; `sh
    jobs/run` finds the cluster's own. Yields (dashboard address, the env to run `ray job submit` with)."""
    tmp_path = tmp_path_factory.mktemp("head")
    bin_dir = os.path.dirname(sys.executable)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path / "home"), "PATH": path}
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TMPDIR", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(key, None)
    with ray_head(env, str(tmp_path / "head.log")) as address:
        yield address, env


@pytest.mark.slow
def test_jobs_submitted_to_a_running_cluster(head, tmp_path):
    address, env = head
    runs = tmp_path / "runs"
    # py_modules of the user's own next to the library the job ships itself: Ray merges the two lists.
    runtime_env = json.dumps({"excludes": [".venv", "runs", "models", ".git"],
                              "py_modules": [os.path.join(REPO, "platform", "recalign")]})
    for entry in (f"sh jobs/run prepare run.root={runs} run.name=cluster",
                  f"sh jobs/run train_sasrec run.root={runs} run.name=cluster model.hidden_size=16 "
                  "model.max_len=10 train.epochs=1 train.num_workers=2"):
        done = ray_cmd(["job", "submit", "--address", address, "--working-dir", REPO,
                        "--runtime-env-json", runtime_env, "--", *entry.split()], env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout
    assert (runs / "cluster" / "data" / "meta.json").exists()
    assert (runs / "cluster" / "baselines" / "sasrec" / "model.pt").exists()


@pytest.mark.slow
def test_a_submitted_job_runs_the_library_it_was_sent_with(head, tmp_path):
    """The head's Python has recalign installed (this checkout, editable); the job is sent with a copy whose
    library differs. The driver, a task on the node, a Ray Data actor, a Ray Train worker and a Serve replica
    all run the copy."""
    address, env = head
    sent = tmp_path / "sent"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(sent / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), sent / name)
    init = sent / "platform" / "recalign" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.1.0+sent"'))
    done = ray_cmd(["job", "submit", "--address", address, "--working-dir", str(sent), "--",
                    "sh", "jobs/run", "check", f"run.root={tmp_path / 'runs'}", f"serve_port={free_ports(1)[0]}"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "0.1.0" in line]
    for who in ("driver", "task on node", "Ray Data actor", "Ray Train worker", "Serve replica"):
        assert any(who in line and "0.1.0+sent" in line for line in lines), (who, lines)
    assert not any("0.1.0 " in line for line in lines), lines  # nobody ran the installed copy


@pytest.mark.slow
def test_a_relative_run_root_in_a_submitted_job_is_an_error(head, tmp_path):
    """Under `ray job submit` a relative run.root would be inside Ray's temporary copy of the working dir."""
    address, env = head
    done = ray_cmd(["job", "submit", "--address", address, "--working-dir", REPO,
                    "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", "models", ".git"]}), "--",
                    "sh", "jobs/run", "train_sasrec", "run.root=runs"], env)
    assert done.returncode != 0
    assert "error: run.root=runs: relative to this job's working dir" in done.stdout + done.stderr

