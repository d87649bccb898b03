"""A Ray cluster of a head and two worker nodes on this machine, and the node-loss scenarios run on it.

Each scenario runs in a process of its own (`run_scenario`, or from the repository root
`PYTHONPATH=.:platform:jobs python -m tests.helpers.cluster train|sample ARGS`): the cluster's nodes are
children of that process and its driver joins the cluster with its own `ray.init`, which a pytest process
that may already run the session's Ray could not do. The process writes what happened as JSON;
tests/recsys/test_node_loss.py and tests/sampling/test_node_loss.py assert on it.

Every node has 1 CPU, so two 1-CPU training workers (or two 0.75-CPU sampler actors) can only sit on two
different nodes, and the two nodes left after one is lost still hold them. A node is removed the hard way
(SIGKILL of all its processes at once, as when a machine dies): the head declares it dead after Ray's default
heartbeat timeout (~15 s), which is left as it is, since what a job does in that window is what is tested.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

from tests.helpers import REPO

NODE_CPUS = 1
# The prompt builder (0.25 CPU) fits next to a sampler actor, and the restarted actor next to it on the head.
SAMPLER_CPUS = 0.75


def run_scenario(name: str, out: str, *args: str, timeout: float = 600) -> dict:
    """Run scenario `name` (train | sample) in a process of its own writing under `out` (created); returns its
    result.json. A failed or timed-out run raises with the tail of its output."""
    os.makedirs(out)
    ray_tmp = f"/tmp/rcnl-{os.getpid()}-{name}"
    paths = [REPO, os.path.join(REPO, "platform"), os.path.join(REPO, "jobs")]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(paths)  # this checkout, in the driver and in every Ray worker
    cmd = [sys.executable, "-m", "tests.helpers.cluster", name, "--out", out, "--ray-tmp", ray_tmp, *args]
    # A session of its own: on a timeout the script and every process of its cluster go, and nothing else.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise TimeoutError(f"the {name} scenario was still running after {timeout}s:\n{log[-4000:]}") from None
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)  # left behind when the script was killed
    result = os.path.join(out, "result.json")
    if proc.returncode != 0 or not os.path.exists(result):
        raise AssertionError(f"the {name} scenario exited with {proc.returncode}:\n{log[-4000:]}")
    with open(result) as f:
        return json.load(f)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_cluster(tmp: str, num_workers: int = 2) -> Iterator:
    """A head and `num_workers` worker nodes of NODE_CPUS CPUs each, all on 127.0.0.1, their files under `tmp`
    (short: unix socket paths under it are capped at 107 bytes), and this process's driver connected to the
    head; everything stopped and `tmp` removed on exit."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: bind to loopback
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    # Cluster writes the head's address to $RAY_TMPDIR/ray/ray_current_cluster: keep it out of /tmp/ray,
    # where it would point other Rays' `ray.init(address="auto")` at this cluster.
    os.environ["RAY_TMPDIR"] = tmp
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
    dashboard_port = _free_port()
    # Ray Train's controller finds the State API by this variable first; without it, it could pick another
    # Ray's dashboard on this machine.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    node_args = dict(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1", object_store_memory=150 * 2**20)
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
        node_args, temp_dir=os.path.join(tmp, "ray"), include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port, dashboard_agent_listen_port=_free_port()))
    try:
        for _ in range(num_workers):
            cluster.add_node(**node_args)  # the other ports are picked free by Ray
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _markers(folder: str, prefix: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, f"{prefix}-*.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out


def _write_marker(folder: str, name: str, record: dict) -> None:
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(folder, f"{name}.json"))  # the watcher never reads half a marker


def _wait_for_removal(markers: str, timeout: float = 120) -> None:
    """Block (in a Ray worker) until the driver has killed a node, or `timeout` seconds."""
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(markers, "removed")) and time.time() < deadline:
        time.sleep(0.2)


def _kill_node(cluster, node_id: str) -> None:
    """SIGKILL every process of worker node `node_id` at once, as a machine failure would: its raylet and agents,
    and the worker processes the raylet started. Ray's remove_node kills only the former, and the workers outlive
    their raylet for a while: a Train worker group, talking to each other over gloo, trains on without it."""
    import psutil

    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    procs = []
    for info in [info for infos in node.all_processes.values() for info in infos]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(info.process.pid)
            procs += [proc, *proc.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    cluster.remove_node(node, allow_graceful=False)  # Ray's own bookkeeping; its processes are gone already


def _remove_when(cluster, victim: Callable[[], str | None], markers: str, result: dict, timeout: float = 300):
    """A thread that polls `victim()` until it names a worker node, kills that node (`_kill_node`), writes the
    `removed` marker that releases the workers waiting in `_wait_for_removal`, and waits until the head has
    marked the node dead. What it did goes to `result`, its failures to result["errors"]."""
    import ray

    def run():
        try:
            deadline = time.time() + timeout
            while (node_id := victim()) is None:
                if time.time() > deadline:
                    raise TimeoutError(f"no node to remove after {timeout}s")
                time.sleep(0.2)
            result.update(removed=node_id, removed_at=time.time())
            _kill_node(cluster, node_id)
            open(os.path.join(markers, "removed"), "w").close()
            while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
                time.sleep(0.5)
            result["seconds_until_marked_dead"] = round(time.time() - result["removed_at"], 1)
        except BaseException as err:  # reported in the result, never lost in a thread
            result["errors"].append(repr(err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------- SASRec training loses a node


def _pause_after_epoch(markers: str, pause_epoch: int):
    """on_epoch_end hook: every worker records its epoch, rank, node and process; after `pause_epoch` it
    waits until the driver has removed a node, so the loss lands mid-training."""

    def on_epoch_end(epoch: int) -> None:
        import ray
        import ray.train

        ctx = ray.train.get_context()
        _write_marker(markers, f"epoch-{epoch}-rank-{ctx.get_world_rank()}-pid-{os.getpid()}",
                      {"epoch": epoch, "rank": ctx.get_world_rank(), "world": ctx.get_world_size(),
                       "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "time": time.time()})
        if epoch == pause_epoch:
            _wait_for_removal(markers)

    return on_epoch_end


def _checkpointed_epoch(experiment_dir: str) -> int | None:
    """The epoch of the newest checkpoint Ray Train's controller has registered, from the snapshot it keeps
    in the run's storage (a worker lost before that would rightly make the run start over)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    path = os.path.join(experiment_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    try:
        with open(path) as f:
            snapshot = json.load(f)
    except (OSError, ValueError):  # not written yet, or being rewritten
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return None if latest is None else latest["metrics"]["epoch"]


def train_scenario(data_dir: str, out: str, ray_tmp: str, epochs: int, max_failures: int) -> dict:
    """fit_sasrec with 2 workers on 2 nodes; once epoch 0's checkpoint is registered, the worker node that
    holds one of them is removed while both wait in the epoch-0 hook."""
    from recalign.recsys.sasrec import SASRecConfig
    from recalign.recsys.train import SASRecJobSpec, SeqTrainConfig, fit_sasrec

    markers = os.path.join(out, "markers")
    os.makedirs(markers)
    spec = SASRecJobSpec(data_dir, SASRecConfig(hidden_size=16, num_heads=2, max_len=10),
                         SeqTrainConfig(epochs=epochs, train_batch_size=32, patience=epochs, num_workers=2,
                                        cpus_per_worker=NODE_CPUS, max_failures=max_failures))
    result: dict = {"errors": []}
    began = time.perf_counter()
    with local_cluster(ray_tmp) as cluster:
        head = cluster.head_node.node_id
        result.update(head=head, workers=[n.node_id for n in cluster.worker_nodes],
                      cluster_seconds=round(time.perf_counter() - began, 1))

        def busy_worker_node() -> str | None:
            first = [m for m in _markers(markers, "epoch") if m["epoch"] == 0]
            if len(first) < 2 or _checkpointed_epoch(os.path.join(out, "ray", "sasrec")) != 0:
                return None
            # The two workers sit on two of the three nodes, so one of them is a worker node (the head, where the
            # driver runs, is not removed: Ray refuses to).
            return next(m["node"] for m in sorted(first, key=lambda m: -m["rank"]) if m["node"] != head)

        watcher = _remove_when(cluster, busy_worker_node, markers, result)
        start = time.perf_counter()
        try:
            result["report"] = fit_sasrec(spec, os.path.join(out, "sasrec"), os.path.join(out, "ray"), "sasrec",
                                          on_epoch_end=_pause_after_epoch(markers, pause_epoch=0))
        except Exception as err:
            result["fit_error"] = f"{type(err).__name__}: {err}"[:2000]
        result["fit_seconds"] = round(time.perf_counter() - start, 1)
        watcher.join(timeout=5)
    result["epochs"] = _markers(markers, "epoch")
    result["model_saved"] = os.path.exists(os.path.join(out, "sasrec", "model.pt"))
    return result


# ---------------------------------------------------------------- sampling loses a node


def _slow_engine(markers: str, delay: float):
    """A FakeEngine that records each batch it starts (node, process) and takes `delay` seconds over it; until
    a node has been removed, a first batch waits for that, so the loss lands inside it."""
    from tests.helpers.fakes import FakeEngine

    class SlowEngine(FakeEngine):
        def generate(self, prompts, n, max_new_tokens, temperature, top_p):
            import ray

            _write_marker(markers, f"batch-{os.getpid()}-{self.calls}",
                          {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                           "call": self.calls, "time": time.time()})
            if self.calls == 0:
                _wait_for_removal(markers)
            time.sleep(delay)
            return super().generate(prompts, n, max_new_tokens, temperature, top_p)

    return SlowEngine()


def _storage_checks(out: str) -> dict:
    """What a job joining this cluster checks of its storage (recalign.cluster.check_storage): a relative
    run.root is refused; an absolute one is probed from every node (here all share one disk, so it passes)."""
    from recalign.cluster import alive_nodes, check_storage
    from recalign.errors import ClusterError

    nodes = alive_nodes()
    checks: dict = {"nodes": len(nodes)}
    try:
        check_storage({"run.root": "runs"}, nodes)
        checks["relative"] = "accepted"
    except ClusterError as err:
        checks["relative"] = str(err)
    root = os.path.join(out, "shared")
    check_storage({"run.root": root}, nodes)
    checks["probe_left"] = os.listdir(root) if os.path.isdir(root) else []
    return checks


def sample_scenario(data_dir: str, model_dir: str, out: str, ray_tmp: str, num_samples: int,
                    max_actor_restarts: int) -> dict:
    """run_sampling with 2 sampler actors on 2 nodes; once both are inside their first batch, the worker node
    of one of them is removed."""
    from recalign import io
    from recalign.data.dataset import Dataset
    from recalign.prompts import PromptConfig
    from recalign.sampling.actors import part_files, read_samples, samples_per_user
    from recalign.sampling.config import SampleConfig
    from recalign.sampling.pipeline import run_sampling

    markers = os.path.join(out, "markers")
    os.makedirs(markers)
    cfg = SampleConfig(model=model_dir, num_samples=num_samples, max_new_tokens=6, batch_size=2, num_actors=2,
                       cpus_per_actor=SAMPLER_CPUS, max_actor_restarts=max_actor_restarts,
                       prompt=PromptConfig(max_history=5))
    result: dict = {"errors": [], "batch_size": cfg.batch_size}
    began = time.perf_counter()
    with local_cluster(ray_tmp) as cluster:
        head = cluster.head_node.node_id
        result.update(head=head, workers=[n.node_id for n in cluster.worker_nodes],
                      cluster_seconds=round(time.perf_counter() - began, 1))
        result["storage"] = _storage_checks(out)

        def busy_worker_node() -> str | None:
            nodes = {m["node"] for m in _markers(markers, "batch")}
            # Both actors inside their first batch, on two nodes: remove the one that is not the head.
            return next(iter(sorted(nodes - {head}))) if len(nodes) == 2 else None

        watcher = _remove_when(cluster, busy_worker_node, markers, result)
        samples_dir = os.path.join(out, "samples")
        start = time.perf_counter()
        try:
            result["meta"] = run_sampling(cfg, data_dir, samples_dir,
                                          engine_factory=functools.partial(_slow_engine, markers, 1.0),
                                          log=lambda line: print(line, flush=True))
        except Exception as err:
            result["run_error"] = f"{type(err).__name__}: {err}"[:2000]
        result["run_seconds"] = round(time.perf_counter() - start, 1)
        watcher.join(timeout=5)
    table = read_samples(samples_dir)
    result["users"] = sorted(int(u) for u in Dataset(data_dir).examples("train")["user_idx"].to_pylist())
    result["samples_per_user"] = {str(u): c for u, c in samples_per_user(table).items()}
    result["raw_rows"] = sum(io.read_parquet(f).num_rows for f in part_files(samples_dir))
    result["rows"] = table.num_rows
    result["batches"] = _markers(markers, "batch")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["train", "sample"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", help="tokenizer folder (sample)")
    parser.add_argument("--out", required=True, help="empty folder; result.json is written there")
    parser.add_argument("--ray-tmp", required=True, help="a short path for the cluster's files (removed at the end)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=3)
    parser.add_argument("--retries", type=int, default=2, help="train: max_failures; sample: max_actor_restarts")
    args = parser.parse_args(argv)
    if args.scenario == "train":
        result = train_scenario(args.data, args.out, args.ray_tmp, args.epochs, args.retries)
    else:
        result = sample_scenario(args.data, args.model, args.out, args.ray_tmp, args.num_samples, args.retries)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
