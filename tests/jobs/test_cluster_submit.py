"""The same jobs run on a Ray cluster: start a head with `ray start`, submit with `ray job submit`."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 (all held open while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


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
    for key in ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(key, None)
    temp_dir = f"/tmp/rcclu-{os.getpid()}"
    gcs_port, dash_port, *others = _free_ports(9)
    # Every port of our own: a second Ray on this machine (another test session, a running demo) holds the
    # defaults, 52365 for the dashboard agent among them, and a head whose agent cannot bind takes no job.
    own_ports = [f"--{name}={port}" for name, port in zip((
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port"), others)]
    # --block keeps `ray start` as the parent of this cluster's processes, so terminating it stops
    # exactly this cluster (never `ray stop`, which would kill every Ray on the machine).
    process = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=4",
                                "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                                f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                                *own_ports],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dash_port}"
        _wait_for_dashboard(address, env)
        yield address, env
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


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
        done = _submit([RAY, "job", "submit", "--address", address, "--working-dir", REPO,
                        "--runtime-env-json", runtime_env, "--", *entry.split()], env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout
    assert (runs / "cluster" / "data" / "meta.json").exists()
    assert (runs / "cluster" / "baselines" / "sasrec" / "model.pt").exists()


@pytest.mark.slow
def test_a_submitted_job_runs_the_library_it_was_sent_with(head, tmp_path):
    """The head's Python has recalign installed (this checkout, editable); the job is sent with a copy whose
    library differs. The driver, a task on the node, a Ray Data actor and a Ray Train worker all run the copy."""
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
    done = _submit([RAY, "job", "submit", "--address", address, "--working-dir", str(sent), "--",
                    "sh", "jobs/run", "check", f"run.root={tmp_path / 'runs'}"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "0.1.0" in line]
    for who in ("driver", "task on node", "Ray Data actor", "Ray Train worker"):
        assert any(who in line and "0.1.0+sent" in line for line in lines), (who, lines)
    assert not any("0.1.0 " in line for line in lines), lines  # nobody ran the installed copy


@pytest.mark.slow
def test_a_relative_run_root_in_a_submitted_job_is_an_error(head, tmp_path):
    """Under `ray job submit` a relative run.root would be inside Ray's temporary copy of the working dir."""
    address, env = head
    done = _submit([RAY, "job", "submit", "--address", address, "--working-dir", REPO,
                    "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", "models", ".git"]}), "--",
                    "sh", "jobs/run", "train_sasrec", "run.root=runs"], env)
    assert done.returncode != 0
    assert "error: run.root=runs: relative to this job's working dir" in done.stdout + done.stderr


def _submit(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting."""
    deadline = time.time() + timeout
    while True:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in done.stderr or time.time() > deadline:
            return done
        time.sleep(3)


def _wait_for_dashboard(address: str, env: dict, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        probe = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"Ray dashboard at {address} did not come up in {timeout}s")
