"""The same jobs run on a Ray cluster: start a head with `ray start`, submit with `ray job submit`."""

import json
import os
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


@pytest.mark.slow
def test_jobs_submitted_to_a_running_cluster(tmp_path):
    # As on a fresh clone without an activated venv: the project's interpreter is not on PATH, so a bare
    # `python` in the entrypoint would be another one; `sh jobs/run` finds the cluster's own.
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
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=4",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                             *own_ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dash_port}"
        _wait_for_dashboard(address, env)
        runs = tmp_path / "runs"
        # py_modules ships this checkout's library with the job, so the cluster runs the code under test
        # even where an older recalign is installed.
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
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()


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
