"""Ray Serve app: the aligned LLM re-ranker over HTTP (POST JSON, see recalign.rerank.service).

    serve run serve.app:app_builder run_dir=runs/demo adapter=policy/rerank/sft+sdpo
    python serve/app.py run_dir=runs/demo adapter=policy/rerank/sft+sdpo     # embedded Ray, 127.0.0.1:8000

Requests are batched with @serve.batch, so concurrent callers share one forward pass.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import asdict, dataclass

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from recalign import io
from recalign.config import option
from recalign.data.dataset import Dataset
from recalign.errors import MissingInputError
from recalign.llm.convert import resolve_model
from recalign.llm.policy import load_policy
from recalign.pairs.stage import rerank_prompt
from recalign.prompts import PromptConfig
from recalign.rerank.scorer import RerankConfig
from recalign.rerank.service import RequestError, RerankService
from recalign.runs import RunSpec


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class Reranker:
    def __init__(self, data_dir: str, model_path: str, adapter: str | None, cfg: dict, prompt: dict, loader=None):
        rerank_cfg = RerankConfig(**cfg)
        loader = loader or functools.partial(load_policy, model_path, adapter, rerank_cfg.dtype)
        name = os.path.basename(model_path.rstrip("/")) + (f"+{adapter}" if adapter else "")
        self.service = RerankService(Dataset(data_dir).items, loader, rerank_cfg, PromptConfig(**prompt),
                                     model_name=name)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _rerank(self, requests: list) -> list[dict]:
        return self.service.rerank(requests)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            parsed = self.service.parse(await request.json())
        except (RequestError, ValueError) as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse(await self._rerank(parsed))


@dataclass
class ServeJob:
    run_dir: str = option("runs/demo", "run whose data/ (item titles) the service reads")
    model: str = option("smollm2", "base model: \"smollm2\" (converted default) or a local HF folder")
    models_dir: str = option("", "where converted models live; empty: <run root>/models (the run dir's parent) when "
                                 "run_dir is a URI or an absolute path, else ./models")
    adapter: str = option("", "LoRA adapter folder (absolute, or relative to run_dir); empty = base model")
    host: str = option("127.0.0.1", "HTTP host of the embedded Serve proxy")
    port: int = option(8000, "HTTP port of the embedded Serve proxy")
    replicas: int = option(1, "Serve replicas; each holds rerank.cpus_per_actor CPUs and rerank.num_gpus GPUs")
    rerank: RerankConfig = option(factory=RerankConfig, help="re-ranker batching, dtype and resources (the prompt "
                                                             "is the run's re-rank prompt)")


def build(cfg: ServeJob, loader=None):
    data_dir = os.path.join(cfg.run_dir, "data")
    if not io.exists(io.join(data_dir, "meta.json")):
        raise MissingInputError(f"run_dir={cfg.run_dir}: no prepared dataset in {data_dir}; point run_dir at a run "
                                "(`make run` writes runs/demo) or prepare one with jobs/prepare.py")
    adapter = cfg.adapter
    if adapter and not os.path.isabs(adapter) and not os.path.exists(adapter):
        adapter = os.path.join(cfg.run_dir, adapter)
    if adapter and not io.exists(io.join(adapter, "adapter_config.json")):
        raise MissingInputError(f"adapter={cfg.adapter}: {adapter} is not a LoRA adapter folder (no "
                                "adapter_config.json); use a policy of the run, e.g. policy/rerank/sft+sdpo, or "
                                "adapter='' for the base model")
    run_dir = cfg.run_dir.rstrip("/")
    models_dir = RunSpec(name=os.path.basename(run_dir), root=os.path.dirname(run_dir) or ".").models(cfg.models_dir)
    model_path = str(resolve_model(cfg.model, models_dir))
    deployment = Reranker.options(num_replicas=cfg.replicas, ray_actor_options={
        "num_cpus": cfg.rerank.cpus_per_actor, "num_gpus": cfg.rerank.num_gpus})
    return deployment.bind(data_dir, model_path, adapter or None, asdict(cfg.rerank),
                           asdict(run_prompt(cfg.run_dir)), loader)


def run_prompt(run_dir: str) -> PromptConfig:
    """The re-rank prompt of the run at `run_dir`: the one its re-rank policies were trained on."""
    run_dir = run_dir.rstrip("/")
    return rerank_prompt(RunSpec(name=os.path.basename(run_dir), root=os.path.dirname(run_dir) or "."))


def app_builder(args: dict[str, str]):
    """`serve run serve.app:app_builder key=value ...` entry."""
    from recalign.config import load_config

    return build(load_config(ServeJob, None, [f"{k}={v}" for k, v in args.items()]))


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))
    from launch import RayConfig, parse_args, ray_session

    cfg = parse_args(ServeJob, argv, __doc__)
    app = build(cfg)  # checks the run, the adapter and the model before Ray starts
    with ray_session(RayConfig(), storage={"run_dir": cfg.run_dir}):
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(app, name="recalign", route_prefix="/rerank", blocking=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))
    from launch import run

    run(main)
