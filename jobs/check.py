"""Check the Ray cluster a job would run on, before a long run finds out the hard way.

    python jobs/check.py [run.root=s3://bucket/runs] [models_dir=...]
    ray job submit --address http://<head>:8265 --working-dir . -- sh jobs/run check run.root=s3://bucket/runs

Prints the nodes and their resources; the recalign that the driver, a task on every node, a Ray Data
actor, a Ray Train worker and (serve_port=<port>) a Serve replica import (one version and the submitted
copy everywhere: the job ships its library with it); and whether run.root and models_dir are storage every node shares (a relative path
on a multi-node cluster is an error; other paths are probed from every node). Exits 2 on a problem.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch import RayConfig, parse_args, ray_session, run

from recalign.cluster import alive_nodes, code_report
from recalign.config import option
from recalign.errors import ClusterError
from recalign.runs import RunSpec


@dataclass
class CheckJob:
    run: RunSpec = option(factory=RunSpec, help="the run root to check (run.root)")
    ray: RayConfig = option(factory=RayConfig, help="cluster address or embedded Ray settings")
    serve_port: int = option(0, "> 0: also start a Serve replica (Serve's proxy on 127.0.0.1:<port> if Serve is not "
                                "running yet) and report its recalign; the app is deleted after")
    models_dir: str = option("", "where models are converted; empty: <run.root>/models when run.root is a URI or "
                                 "an absolute path, else ./models")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(CheckJob, argv, __doc__)
    storage = {"run.root": cfg.run.root, "models_dir": cfg.run.models(cfg.models_dir)}
    with ray_session(cfg.ray, storage=storage):
        nodes = alive_nodes()
        print(f"{len(nodes)} node(s):")
        for node in nodes:
            resources = {k: v for k, v in node["Resources"].items() if not k.startswith("node:")}
            print(f"  {node['NodeManagerAddress']} {node['NodeID'][:8]}  {resources}")
        report = code_report(nodes, cfg.serve_port)
    seen = [("driver", report["driver"])] + [(f"task on node {r['node']}", r) for r in report["tasks"]] + [
        ("Ray Data actor", report["data_actor"]), ("Ray Train worker", report["train_worker"])] + (
        [("Serve replica", report["serve_replica"])] if "serve_replica" in report else [])
    print("recalign imported by:")
    for who, where in seen:
        print(f"  {who:<24} {where['version']}  {where['path']}")
    for key, path in storage.items():
        print(f"{key}: {path} (shared by every node)" if len(nodes) > 1 else f"{key}: {path}")
    versions = {where["version"] for _, where in seen}
    if len(versions) > 1:
        raise ClusterError(f"Ray processes run different recalign versions {sorted(versions)}; submit with "
                           "`sh jobs/run <job>` so the job ships its library")
    print("ok")
    return {"nodes": len(nodes), "code": report, "storage": storage}


if __name__ == "__main__":
    run(main)
