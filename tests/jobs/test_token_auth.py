"""Ray's token authentication on a real head started as cluster.yaml starts it (RAY_AUTH_MODE=token): a job
submitted without the token is refused, and the same submission with it is accepted and runs.

How a client passes the token (Ray 2.60): RAY_AUTH_MODE=token in its environment, plus the token in
RAY_AUTH_TOKEN, in the file RAY_AUTH_TOKEN_PATH names, or in ~/.ray/auth_token. Without the mode a client sends
no token at all, even when it has one."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
OWN_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")


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


# What a busy head answers now and then, unlike an authentication error: the job agent still starting, a
# dashboard too loaded to answer in time.
TRANSIENT = ("No available agent", "Failed to connect", "ConnectionError", "timed out")


def _ray(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """A `ray ...` command, retried while the head answers with a transient error."""
    deadline = time.time() + timeout
    while True:
        done = subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=600)
        if not any(sign in done.stderr for sign in TRANSIENT) or time.time() > deadline:
            return done
        time.sleep(3)


def _wait_for_dashboard(address: str, env: dict, head: subprocess.Popen, log: str, timeout: float = 420) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"the head exited ({head.returncode}): {open(log).read()[-3000:]}")
        if _ray(["job", "list", "--address", address], env, timeout=0).returncode == 0:  # one try: re-check head
            return
        time.sleep(2)
    raise TimeoutError(f"Ray dashboard at {address} did not come up in {timeout}s: {open(log).read()[-3000:]}")


@pytest.mark.ray
def test_a_token_auth_head_takes_jobs_only_with_its_token(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "HOME": str(tmp_path / "home")}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(key, None)
    # As docs/cluster.md has the user make it before `ray up`: printed, and written to ~/.ray/auth_token, where
    # the head (started with this HOME) reads it.
    made = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=300)
    token = made.stdout.strip()
    assert made.returncode == 0 and len(token) >= 32, made.stderr
    assert (tmp_path / "home" / ".ray" / "auth_token").read_text().strip() == token

    temp_dir = f"/tmp/rctok-{os.getpid()}"
    gcs_port, dash_port, *others = _free_ports(2 + len(OWN_PORTS))
    log = str(tmp_path / "head.log")
    head_out = open(log, "w")
    # Every port of our own (another Ray on this machine holds the defaults); --block keeps `ray start` the parent
    # of this cluster's processes, so terminating it stops exactly this cluster (never `ray stop`).
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                             *[f"--{name}={port}" for name, port in zip(OWN_PORTS, others)]],
                            env={**env, "RAY_AUTH_MODE": "token"}, stdout=head_out, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash_port}"
    # A client machine: its own HOME, no token file until it is given one.
    client = {**env, "HOME": str(tmp_path / "client")}
    submit = ["job", "submit", "--address", address, "--", sys.executable, "-c",
              "import ray; ray.init(); print('cluster CPUs:', ray.cluster_resources()['CPU'])"]
    token_file = tmp_path / "token"
    token_file.write_text(token)
    try:
        # Waiting doubles as the first accepted client: the token in a file that RAY_AUTH_TOKEN_PATH names.
        _wait_for_dashboard(address, {**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)},
                            head, log)

        for why, extra, refusal in [
            ("no token", {}, "Missing authentication token"),
            ("the token without the mode", {"RAY_AUTH_TOKEN": token}, "Missing authentication token"),
            ("a wrong token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * len(token)},
             "Invalid authentication token"),
        ]:
            done = _ray(submit, {**client, **extra})
            assert done.returncode != 0 and refusal in done.stderr, f"{why}: {done.stdout[-2000:]}{done.stderr[-2000:]}"

        done = _ray(submit, {**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # The job's own driver joined the cluster too: it inherits the head's mode and finds the head's token.
        assert "succeeded" in done.stdout and "cluster CPUs: 1.0" in done.stdout, done.stdout[-3000:]

        # The third place a client keeps it: ~/.ray/auth_token, as on the machine that made it.
        (tmp_path / "client" / ".ray").mkdir(parents=True)
        (tmp_path / "client" / ".ray" / "auth_token").write_text(token)
        listed = _ray(["job", "list", "--address", address], {**client, "RAY_AUTH_MODE": "token"})
        assert listed.returncode == 0, listed.stderr[-2000:]
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        head_out.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
