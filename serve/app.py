"""Ray Serve app: the aligned LLM re-ranker behind a typed HTTP API (FastAPI; OpenAPI at /docs).

    serve run serve.app:app_builder run_dir=runs/demo adapter=policy/rerank/sft+sdpo auth=none
    RECALIGN_API_KEYS=k1,k2 python serve/app.py run_dir=runs/demo adapter=policy/rerank/sft+sdpo   # 127.0.0.1:8000

    POST /v1/rerank   {"history": [...] | "user_id": "...", "ratings"?, "candidates": [...], "top_n"?, "explain"?}
    GET  /v1/systems  what this deployment serves
    GET  /healthz     liveness (no key needed)

Every bad request is a 4xx JSON error naming the field (recalign.rerank.api); keys are checked as
`Authorization: Bearer <key>`. Concurrent requests share one forward pass (@serve.batch, sized to the
scorer's batch), run off the replica's event loop; the free-text answer is decoded only with explain=true.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass

from fastapi import FastAPI
from ray import serve
from ray.serve import metrics
from ray.serve.config import BackpressureConfig
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
from recalign.rerank.api import (ApiError, ApiKeys, ApiLimits, RerankReply, RerankRequest, parse_request, read_json,
                                 short)
from recalign.rerank.scorer import RerankConfig
from recalign.rerank.service import RerankService
from recalign.runs import RunSpec

log = logging.getLogger("ray.serve")
api = FastAPI(title="recalign re-ranker", version="1",
              description="Re-rank candidate items for a user's history with the run's aligned LLM.")
REQUEST_SCHEMA = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": RerankRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body", f"{short(declared)} bytes declared; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body", f"over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error_reply(err: ApiError, request_id: str) -> JSONResponse:
    return JSONResponse({**err.body(), "request_id": request_id}, status_code=err.status, headers=err.headers)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16, max_queued_requests=64,
                  health_check_period_s=10, health_check_timeout_s=60, graceful_shutdown_timeout_s=20)
@serve.ingress(api)
class Reranker:
    def __init__(self, data_dir: str, model_path: str, adapter: str | None, cfg: dict, prompt: dict,
                 key_digests: list[bytes] | None, limits: dict, system: str, loader=None):
        rerank_cfg = RerankConfig(**cfg)
        loader = loader or functools.partial(load_policy, model_path, adapter, rerank_cfg.dtype)
        name = os.path.basename(model_path.rstrip("/")) + (f"+{adapter}" if adapter else "")
        data = Dataset(data_dir)
        self.limits = ApiLimits(**limits)
        self.service = RerankService(data.items, loader, rerank_cfg, PromptConfig(**prompt), model_name=name,
                                     users=data.tables["users"].to_pandas(), limits=self.limits)
        self.keys = ApiKeys(key_digests) if key_digests is not None else None
        self.system = system
        self._rerank.set_max_batch_size(max(rerank_cfg.batch_size, 1))
        first = self.service.parse({"history": [], "candidates": [str(self.service.items["item_id"].iloc[0])]})
        self.probe = self.service.prompt(first)
        # Application metrics, exported by Ray's metrics agent for Prometheus as ray_recalign_* (docs/serving.md).
        self.requests = metrics.Counter("recalign_requests", "re-rank requests by HTTP status and system",
                                        tag_keys=("status", "system"))
        self.latency = metrics.Histogram("recalign_request_seconds", "re-rank latency in the replica, seconds",
                                         boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
                                         tag_keys=("system",))
        self.batch_size = metrics.Histogram("recalign_batch_size", "requests per forward pass",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64])

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _rerank(self, requests: list) -> list[dict]:
        # Torch blocks: run it in a thread so the replica keeps answering (health checks, 4xx) meanwhile.
        self.batch_size.observe(len(requests))
        return await asyncio.to_thread(self.service.rerank, requests)

    @api.post("/v1/rerank", response_model=RerankReply, openapi_extra=REQUEST_SCHEMA,
              responses={code: {"description": why} for code, why in [
                  (401, "no API key"), (403, "wrong API key"), (404, "unknown system or user"),
                  (413, "body too large"), (422, "a field is invalid (named in error.field)"),
                  (503, "overloaded: retry later")]})
    async def rerank(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        response = await self._answer(request)
        self.requests.inc(tags={"status": str(response.status_code), "system": self.system})
        self.latency.observe(time.perf_counter() - start, tags={"system": self.system})
        return response

    async def _answer(self, request: Request) -> JSONResponse:
        request_id = uuid.uuid4().hex
        try:
            if self.keys is not None:
                self.keys.check(request.headers.get("authorization"))
            req = parse_request(read_json(await read_body(request, self.limits.max_body_bytes), self.limits),
                                self.limits)
            if req.system is not None and req.system != self.system:
                raise ApiError(404, "system", f"unknown system {short(req.system)}; this deployment serves "
                                              f"{[self.system]}")
            parsed = self.service.parse(req)
        except ApiError as err:
            return error_reply(err, request_id)
        reply = await self._rerank(parsed)
        return JSONResponse({"request_id": request_id, "system": self.system, **reply})

    @api.get("/v1/systems")
    async def systems(self, request: Request) -> JSONResponse:
        try:
            if self.keys is not None:
                self.keys.check(request.headers.get("authorization"))
        except ApiError as err:
            return error_reply(err, uuid.uuid4().hex)
        return JSONResponse({"default": self.system, "systems": [
            {"name": self.system, "model": self.service.model_name, "kind": "llm-letter-logits",
             "max_candidates": self.limits.max_candidates, "max_history": self.limits.max_history}]})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "system": self.system}

    def check_health(self) -> None:
        """Serve's health check: one tiny forward pass; an exception marks the replica unhealthy."""
        self.service.scorer({"row": [0], "prompt": [self.probe]}, generate=False)


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
    auth: str = option("keys", "keys: Authorization: Bearer <key>, keys from keys_file or $RECALIGN_API_KEYS "
                               "(comma-separated) | none: no keys (said at start)")
    keys_file: str = option("", "file of API keys, one per line; read here, only their SHA-256 goes to replicas")
    limits: ApiLimits = option(factory=ApiLimits, help="request size limits")
    max_ongoing_requests: int = option(16, "requests a replica works on at once")
    max_queued_requests: int = option(64, "requests queued per caller before the endpoint answers 503")
    retry_after_s: float = option(1.0, "the Retry-After (seconds) of that 503")
    request_timeout_s: float = option(60.0, "the HTTP proxy gives up on a request after this many seconds")


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
    keys = ApiKeys.load(cfg.auth, cfg.keys_file)
    if keys is None:
        print("recalign serve: auth=none: the endpoint takes requests WITHOUT API keys", file=sys.stderr)
    deployment = Reranker.options(num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
                                  max_queued_requests=cfg.max_queued_requests,
                                  backpressure_config=BackpressureConfig(status_code=503,
                                                                         retry_after_s=cfg.retry_after_s),
                                  ray_actor_options={
                                      "num_cpus": cfg.rerank.cpus_per_actor, "num_gpus": cfg.rerank.num_gpus})
    system = "llm:" + (os.path.basename(cfg.adapter.rstrip("/")) if cfg.adapter else "base")
    return deployment.bind(data_dir, model_path, adapter or None, asdict(cfg.rerank),
                           asdict(run_prompt(cfg.run_dir)), keys.digests if keys else None, asdict(cfg.limits),
                           system, loader)


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
        serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
        serve.run(app, name="recalign", route_prefix="/", blocking=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))
    from launch import run

    run(main)
