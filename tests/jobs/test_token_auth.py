"""Ray's token authentication on a real head started as cluster.yaml starts it (RAY_AUTH_MODE=token): a job
submitted without the token is refused, and the same submission with it is accepted and runs.

How a client passes the token (Ray 2.60): RAY_AUTH_MODE=token in its environment, plus the token in
RAY_AUTH_TOKEN, in the file RAY_AUTH_TOKEN_PATH names, or in ~/.ray/auth_token. Without the mode a client sends
no token at all, even when it has one."""

import os
import subprocess
import sys

import pytest

from tests.helpers.ray_head import RAY, ray_cmd, ray_head


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

    log = str(tmp_path / "head.log")
    # A client machine: its own HOME, no token file until it is given one.
    client = {**env, "HOME": str(tmp_path / "client")}
    token_file = tmp_path / "token"
    token_file.write_text(token)
    # Waiting for the head doubles as the first accepted client: the token in a file that RAY_AUTH_TOKEN_PATH names.
    with ray_head({**env, "RAY_AUTH_MODE": "token"}, log, num_cpus=1,
                  client_env={**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}) as address:
        submit = ["job", "submit", "--address", address, "--", sys.executable, "-c",
                  "import ray; ray.init(); print('cluster CPUs:', ray.cluster_resources()['CPU'])"]
        for why, extra, refusal in [
            ("no token", {}, "Missing authentication token"),
            ("the token without the mode", {"RAY_AUTH_TOKEN": token}, "Missing authentication token"),
            ("a wrong token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * len(token)},
             "Invalid authentication token"),
        ]:
            done = ray_cmd(submit, {**client, **extra})
            assert done.returncode != 0 and refusal in done.stderr, f"{why}: {done.stdout[-2000:]}{done.stderr[-2000:]}"

        done = ray_cmd(submit, {**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # The job's own driver joined the cluster too: it inherits the head's mode and finds the head's token.
        assert "succeeded" in done.stdout and "cluster CPUs: 1.0" in done.stdout, done.stdout[-3000:]

        # The third place a client keeps it: ~/.ray/auth_token, as on the machine that made it.
        (tmp_path / "client" / ".ray").mkdir(parents=True)
        (tmp_path / "client" / ".ray" / "auth_token").write_text(token)
        listed = ray_cmd(["job", "list", "--address", address], {**client, "RAY_AUTH_MODE": "token"})
        assert listed.returncode == 0, listed.stderr[-2000:]
