"""What a job checks and sets up when it joins a Ray cluster (RAY_ADDRESS, as `ray job submit` sets).

- Code: the job ships the `recalign` package its driver imported as a runtime_env `py_modules`, so every
  Train worker, Data actor and Serve replica runs the code that was submitted, not an older copy installed
  on the node (`shipped_runtime_env`). A submitted job whose driver imported another copy than the one in
  its working dir is an error (`check_driver_code`).
- Storage: on a multi-node cluster each node has its own disk, so a relative run.root or models_dir is an
  error; an absolute path or a URI is checked by writing a probe from the driver and reading it (and
  writing one back) on every node (`check_storage`).
- `code_report` says which recalign every kind of Ray process runs (the `check` job prints it).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Iterable

import recalign
from recalign import io
from recalign.errors import ClusterError, first_line

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job manager in a submitted job's driver
SHARED_HINT = "s3://<bucket>/recalign/runs, gs://<bucket>/..., or a folder every node mounts at the same path"


def package_dir() -> str:
    """The folder of the recalign package this process imported."""
    return os.path.dirname(os.path.abspath(recalign.__file__))


def in_submitted_job() -> bool:
    return JOB_CONFIG_ENV in os.environ


def shipped_runtime_env() -> tuple[dict[str, Any], bool]:
    """(runtime_env for the driver's ray.init, whether it must override the job's own): py_modules = this
    driver's recalign, plus any py_modules the job was submitted with (Ray refuses to merge two lists of
    the same field unless told to override, so the driver passes the union)."""
    modules = [package_dir()]
    job_env = (json.loads(os.environ[JOB_CONFIG_ENV]).get("runtime_env") or {}) if in_submitted_job() else {}
    submitted = list(job_env.get("py_modules") or [])
    return {"py_modules": modules + [m for m in submitted if m not in modules]}, bool(submitted)


def check_driver_code(cwd: str | None = None) -> None:
    """In a submitted job whose working dir holds platform/recalign, the driver must have imported that copy:
    otherwise the job would run the node's installed library, silently ignoring the code that was sent."""
    if not in_submitted_job():
        return
    sent = os.path.join(cwd or os.getcwd(), "platform", "recalign")
    if os.path.isdir(sent) and os.path.realpath(sent) != os.path.realpath(package_dir()):
        raise ClusterError(f"this job was sent with {sent} but its driver imported recalign from {package_dir()}; "
                           "submit the entrypoint as `sh jobs/run <job> ...` (it puts the sent platform/ first on "
                           "the path) or set PYTHONPATH=platform")


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_storage(paths: dict[str, str], nodes: list[dict[str, Any]] | None = None, cwd: str | None = None) -> None:
    """ClusterError unless every path in `paths` ({config key: path or URI}) is storage every node shares.

    A relative path is an error on a multi-node cluster (each node would write its own), and in any
    submitted job whose working dir is Ray's runtime-env copy (Ray deletes that copy with its cache). On a
    multi-node cluster the rest are probed from every node."""
    nodes = alive_nodes() if nodes is None else nodes
    cwd = cwd or os.getcwd()
    temporary = in_submitted_job() and "runtime_resources" in cwd.split(os.sep)
    for key, path in paths.items():
        if not path or "://" in path or os.path.isabs(path):
            continue
        if len(nodes) > 1:
            raise ClusterError(f"{key}={path}: a relative path on a {len(nodes)}-node Ray cluster is each node's own "
                               f"disk; set {key} to storage every node shares: {SHARED_HINT}")
        if temporary:
            raise ClusterError(f"{key}={path}: relative to this job's working dir, Ray's temporary copy of what was "
                               f"submitted ({cwd}), which Ray deletes; set {key} to an absolute path or {SHARED_HINT}")
    if len(nodes) > 1:
        for key, path in paths.items():
            if path:
                _probe(key, os.path.abspath(path) if "://" not in path else path, nodes)


def _probe(key: str, root: str, nodes: list[dict[str, Any]]) -> None:
    """The driver writes a probe under `root`; a task on every node reads it and writes its own back."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex[:12]
    probe = io.join(root, f".recalign-probe-{token}")
    try:
        io.write_text(token, probe)
    except Exception as err:  # noqa: BLE001 -- any storage failure is the user's to fix
        raise ClusterError(f"{key}={root}: the driver cannot write there ({first_line(err)})") from err
    try:
        visit = ray.remote(_visit_probe)
        pending = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: visit.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False), num_cpus=0).remote(probe)
            for n in nodes}
        problems = {node: problem for node, problem in zip(pending, ray.get(list(pending.values()), timeout=120))
                    if problem}
    finally:
        for uri in [probe] + [f"{probe}.{n['NodeID'][:8]}" for n in nodes]:
            try:
                io.delete(uri)
            except Exception:  # noqa: BLE001 -- best effort: a probe left behind is harmless
                pass
    if problems:
        listed = "; ".join(f"node {node}: {problem}" for node, problem in problems.items())
        raise ClusterError(f"{key}={root}: not storage every node shares ({listed}); set {key} to {SHARED_HINT}, "
                           "with write access from every node (an instance profile on AWS)")


def _visit_probe(probe: str) -> str:
    """'' when this node reads the driver's probe and can write beside it, else what went wrong."""
    import ray

    try:
        if not io.exists(probe) or io.read_text(probe) != probe.rsplit("-", 1)[-1]:
            return "does not see the driver's probe file"
        io.write_text("ok", f"{probe}.{ray.get_runtime_context().get_node_id()[:8]}")
    except Exception as err:  # noqa: BLE001
        return f"cannot read or write there ({first_line(err)})"
    return ""


def process_report() -> dict[str, str]:
    """Which recalign this process runs: version, folder, and the node it is on."""
    import ray

    return {"version": recalign.__version__, "path": package_dir(),
            "node": ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else ""}


def code_report(nodes: Iterable[dict[str, Any]] | None = None, serve_port: int = 0) -> dict[str, Any]:
    """The recalign seen by the driver, by a task on every node, by a Ray Data actor, by a Ray Train worker and
    (`serve_port` > 0: Serve's HTTP proxy on 127.0.0.1 there, when Serve is not running yet) by a Serve replica:
    a job that ships its code sees one version everywhere."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = list(alive_nodes() if nodes is None else nodes)
    task = ray.remote(num_cpus=0)(process_report)
    tasks = ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                     .remote() for n in nodes], timeout=300)
    report = {"driver": process_report(), "tasks": tasks, "data_actor": _data_actor_report(),
              "train_worker": _train_worker_report()}
    if serve_port:
        report["serve_replica"] = _serve_replica_report(serve_port)
    return report


def _serve_replica_report(port: int) -> dict[str, str]:
    """A one-replica Serve app (its own name, deleted after) that answers with its process report."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Reporter:
        def __call__(self) -> dict[str, str]:
            return process_report()

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    name = f"recalign-check-{uuid.uuid4().hex[:8]}"
    handle = serve.run(Reporter.bind(), name=name, route_prefix=None)
    try:
        return handle.remote().result(timeout_s=300)
    finally:
        serve.delete(name)


class _Reporter:
    def __call__(self, batch: dict) -> dict:
        import numpy as np

        report = process_report()
        return {key: np.array([value] * len(batch["id"])) for key, value in report.items()}


def _data_actor_report() -> dict[str, str]:
    import ray.data
    from ray.data import ActorPoolStrategy

    rows = ray.data.range(2).map_batches(
        _Reporter, compute=ActorPoolStrategy(size=1), batch_size=1, num_cpus=0.5).take_all()
    return {key: str(rows[0][key]) for key in ("version", "path", "node")}


def _train_loop(config: dict) -> None:
    import ray

    ray.get(config["inbox"].put.remote(process_report()))


class _Inbox:
    """Holds what a Train worker hands back (Train V2 returns metrics only with a checkpoint)."""

    def __init__(self):
        self.value: dict[str, str] = {}

    def put(self, value: dict[str, str]) -> None:
        self.value = value

    def get(self) -> dict[str, str]:
        return self.value


def _train_worker_report() -> dict[str, str]:
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    inbox = ray.remote(num_cpus=0)(_Inbox).remote()
    with tempfile.TemporaryDirectory(prefix="recalign-check-") as tmp:
        TorchTrainer(_train_loop, train_loop_config={"inbox": inbox},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                     run_config=RunConfig(name=f"check-{uuid.uuid4().hex[:8]}", storage_path=tmp)).fit()
    report = ray.get(inbox.get.remote())
    ray.kill(inbox)
    return report
