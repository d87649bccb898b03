"""A Ray head of a test's own, started as a cluster starts it (`ray start --head --block`), and `ray` commands
against it. Every port is its own (another Ray on this machine holds the defaults, 52365 for the dashboard agent
among them); `--block` keeps `ray start` the parent of this cluster's processes, so terminating it stops exactly
this cluster (never `ray stop`, which would kill every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from typing import Iterator

from tests.helpers import free_ports, stop

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
OWN_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
# What a busy head answers now and then, unlike a real refusal: the job agent still starting, a dashboard too
# loaded to answer in time.
# What an embedded Ray of this test session (the `ray_local` fixture) leaves in os.environ that would point the
# head's jobs at it: Ray Train's controller asks the State API at RAY_API_SERVER_ADDRESS first.
SESSION_ONLY = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TMPDIR")
TRANSIENT = ("No available agent", "Failed to connect", "ConnectionError", "timed out")


def ray_cmd(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """A `ray ...` command, retried while the head answers with a transient error. What the session's own
    embedded Ray left in `env` is dropped: `ray job submit --address X` goes to RAY_API_SERVER_ADDRESS when set."""
    env = {k: v for k, v in env.items() if k not in SESSION_ONLY}
    deadline = time.time() + timeout
    while True:
        done = subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=900)
        if not any(sign in done.stderr for sign in TRANSIENT) or time.time() > deadline:
            return done
        time.sleep(3)


@contextlib.contextmanager
def ray_head(env: dict, log: str, num_cpus: int = 4, client_env: dict | None = None,
             timeout: float = 420) -> Iterator[str]:
    """Start a head with `env`, wait until its Jobs API answers a client with `client_env` (default `env`), yield
    its dashboard address; stopped by PID on exit. The head's output goes to `log`, quoted when it fails."""
    env = {k: v for k, v in env.items() if k not in SESSION_ONLY}
    temp_dir = f"/tmp/rchead-{os.getpid()}-{os.urandom(2).hex()}"
    gcs_port, dash_port, *others = free_ports(2 + len(OWN_PORTS))
    out = open(log, "w")
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs_port}", f"--num-cpus={num_cpus}",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                             *[f"--{name}={port}" for name, port in zip(OWN_PORTS, others)]],
                            env=env, stdout=out, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + timeout
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"the head exited ({head.returncode}): {open(log).read()[-3000:]}")
            if ray_cmd(["job", "list", "--address", address], client_env or env, timeout=0).returncode == 0:
                break
            if time.time() > deadline:
                raise TimeoutError(f"Ray dashboard at {address} did not come up in {timeout}s: "
                                   f"{open(log).read()[-3000:]}")
            time.sleep(2)
        yield address
    finally:
        stop(head, timeout=60)
        out.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
