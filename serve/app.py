"""Ray Serve app: the run's re-rankers behind a typed HTTP API (FastAPI; OpenAPI at /docs).

    serve run serve.app:app_builder run_dir=runs/demo auth=none
    RECALIGN_API_KEYS=k1,k2 python serve/app.py run_dir=runs/demo system=llm:sft+sdpo   # 127.0.0.1:8000

    POST /v1/rerank   {"history": [...] | "user_id": "...", "ratings"?, "candidates": [...], "top_n"?, "explain"?,
                       "system"?}
    GET  /v1/systems  what this deployment serves, with each system's validation metrics
    GET  /healthz     liveness (no key needed)

Systems: llm:base, llm:<label> for every finished re-rank policy of the run (and any `adapters`), sasrec when
the run has its SASRec, fusion when its evaluation chose a fusion weight (eval/validation.json). The default is
`system`, else `adapter`'s, else the best by the run's validation NDCG@10, else llm:base.

Every bad request is a 4xx JSON error naming the field (recalign.rerank.api); keys are checked as
`Authorization: Bearer <key>`. Concurrent requests share one forward pass (@serve.batch, sized to the
scorer's batch), run off the replica's event loop; the free-text answer is decoded only with explain=true.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
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
from recalign.errors import MissingInputError, UserError
from recalign.llm.convert import resolve_model
from recalign.llm.policy import load_policy
from recalign.pairs.stage import rerank_prompt
from recalign.prompts import PromptConfig
from recalign.rerank.api import (ApiError, ApiKeys, ApiLimits, RerankReply, RerankRequest, parse_request, read_json,
                                 short)
from recalign.rerank.scorer import RerankConfig
from recalign.rerank.service import ParsedRequest, RerankService
from recalign.runs import RunSpec, run_at

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


@dataclass
class ServeJob:
    run_dir: str = option("runs/demo", "run whose data/ (item titles) the service reads")
    model: str = option("smollm2", "base model: \"smollm2\" (converted default) or a local HF folder")
    models_dir: str = option("", "where converted models live; empty: <run root>/models (the run dir's parent) when "
                                 "run_dir is a URI or an absolute path, else ./models")
    system: str = option("", "the default system (sasrec, fusion, llm:base, llm:<policy label>); empty: adapter's, "
                             "else the best by the run's validation NDCG@10 (eval/validation.json), else llm:base")
    adapter: str = option("", "LoRA adapter folder (absolute, or relative to run_dir) served as llm:<folder name> "
                              "and made the default unless `system` is set")
    adapters: list[str] = option(factory=list, help="more adapter folders, each served as system llm:<folder name> "
                                                    "beside llm:base and the default (POST /v1/rerank system=...)")
    discover: bool = option(True, "also serve the run's own systems: every finished re-rank policy "
                                  "(llm:<label>), sasrec and fusion where the run has them")
    max_adapters: int = option(2, "non-default systems a replica keeps loaded (LRU, @serve.multiplexed)")
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


def adapter_path(run_dir: str, value: str) -> str:
    """An adapter option's folder: absolute or existing as given, else relative to the run dir."""
    return value if os.path.isabs(value) or "://" in value or os.path.exists(value) else os.path.join(run_dir, value)


def _absolute(path: str) -> str:
    return path if "://" in path or os.path.isabs(path) else os.path.abspath(path)


def plan_systems(cfg: ServeJob) -> tuple[dict[str, dict], str]:
    """The systems a deployment serves ({name: {kind, adapter, weight?, reranker?, validation?}}) and its default."""
    systems, validation = run_systems(cfg) if cfg.discover else ({"llm:base": {"kind": "llm", "adapter": None}}, {})
    for field, value in [("adapter", cfg.adapter)] + [(f"adapters[{i}]", a) for i, a in enumerate(cfg.adapters)]:
        if not value:
            continue
        path = adapter_path(cfg.run_dir, value)
        if not io.exists(io.join(path, "adapter_config.json")):
            raise MissingInputError(f"{field}={value}: {path} is not a LoRA adapter folder (no adapter_config.json);"
                                    " use a policy of the run, e.g. policy/rerank/sft+sdpo, or adapter='' for the "
                                    "base model")
        name = "llm:" + os.path.basename(value.rstrip("/"))
        known = systems.get(name, {}).get("adapter")
        if known is not None and os.path.abspath(known) != os.path.abspath(path):
            raise UserError(f"{field}={value}: system {name} is already {known}; give adapters distinct "
                            "folder names")
        systems[name] = {**systems.get(name, {}), "kind": "llm", "adapter": path}
    best = validation.get("best", "")
    default = (cfg.system or ("llm:" + os.path.basename(cfg.adapter.rstrip("/")) if cfg.adapter else "")
               or (best if best in systems else "") or "llm:base")
    if default not in systems:
        raise UserError(f"system={cfg.system}: this deployment serves {sorted(systems)}")
    return systems, default


def serve_name(system: str) -> str:
    """An evaluation system's name as the endpoint's: 'llm zero-shot' -> 'llm:base', 'llm sft' -> 'llm:sft'."""
    if system == "llm zero-shot":
        return "llm:base"
    return "llm:" + system[len("llm "):] if system.startswith("llm ") else system


def run_systems(cfg: ServeJob) -> tuple[dict[str, dict], dict]:
    """The systems the run at cfg.run_dir has, {name: {kind, adapter, weight?, validation?}}, and its
    eval/validation.json ({} without one, its `best` a serve name). Fusion needs SASRec and that file."""
    from recalign.evaluation.stage import discover_policies

    run = run_spec(cfg.run_dir.rstrip("/"))
    systems: dict[str, dict] = {}
    for policy in discover_policies(run)[0]:
        systems[serve_name(policy.name)] = {"kind": "llm", "adapter": policy.adapter}
    has_sasrec = io.exists(run.dir("baselines", "sasrec", "model.pt"))
    if has_sasrec:
        systems["sasrec"] = {"kind": "sasrec", "adapter": None}
    uri = run.dir("eval", "validation.json")
    validation = io.read_json(uri) if io.exists(uri) else {}
    fusion = validation.get("fusion", {})
    partner = systems.get(serve_name(fusion.get("reranker", "")))
    if has_sasrec and partner is not None:
        systems["fusion"] = {"kind": "fusion", "adapter": partner["adapter"], "weight": float(fusion["weight"]),
                             "reranker": serve_name(fusion["reranker"])}
    for name, metrics_ in validation.get("systems", {}).items():
        if serve_name(name) in systems:
            systems[serve_name(name)]["validation"] = {"rows": validation["rows"], **metrics_}
    if validation:
        validation = {**validation, "best": serve_name(validation["best"])}
    return systems, validation


def run_prompt(run_dir: str) -> PromptConfig:
    """The re-rank prompt of the run at `run_dir`: the one its re-rank policies were trained on."""
    run_dir = run_dir.rstrip("/")
    return rerank_prompt(run_spec(run_dir))


def run_spec(run_dir: str) -> RunSpec:
    """The run at `run_dir` (its parent the root)."""
    return run_at(run_dir)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16, max_queued_requests=64,
                  health_check_period_s=10, health_check_timeout_s=60, graceful_shutdown_timeout_s=20)
@serve.ingress(api)
class Reranker:
    """One replica: the default system resident, the others' adapters loaded on demand into an LRU of
    `max_adapters` (@serve.multiplexed), each a base model with its LoRA merged."""

    def __init__(self, data_dir: str, model_path: str, systems: dict[str, dict], default: str, cfg: dict,
                 prompt: dict, key_digests: list[bytes] | None, limits: dict, max_adapters: int, sasrec_dir: str = "",
                 run_dir: str = "", discover: bool = True):
        self.model_path, self.rerank_cfg, self.prompt_cfg = model_path, RerankConfig(**cfg), PromptConfig(**prompt)
        self.sasrec_dir, self._sasrec, self.run_dir, self.discover = sasrec_dir, None, run_dir, discover
        self.data = Dataset(data_dir)
        self.users = self.data.tables["users"].to_pandas()
        self.limits = ApiLimits(**limits)
        # Systems by generation: `reconfigure` starts a new one, and a request keeps the generation it was
        # admitted in, so a batch in flight never loses its system. LRU entries are "<generation>:<system>".
        self.generation, self._specs, self.default = 0, {0: systems}, default
        self.service = self._load_service(default, 0)
        self.keys = ApiKeys(key_digests) if key_digests is not None else None

        async def load(model_id: str) -> RerankService:
            generation, _, system = model_id.partition(":")
            return await asyncio.to_thread(self._load_service, system, int(generation))

        self._loaded = serve.multiplexed(max_num_models_per_replica=max(max_adapters, 1))(load)
        self._rerank.set_max_batch_size(max(self.rerank_cfg.batch_size, 1))
        self.probe = self.service.parse({"history": [], "candidates": [str(self.service.items["item_id"].iloc[0])]})
        # Application metrics, exported by Ray's metrics agent for Prometheus as ray_recalign_* (docs/serving.md).
        self.requests = metrics.Counter("recalign_requests", "re-rank requests by HTTP status and system",
                                        tag_keys=("status", "system"))
        self.latency = metrics.Histogram("recalign_request_seconds", "re-rank latency in the replica, seconds",
                                         boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
                                         tag_keys=("system",))
        self.batch_size = metrics.Histogram("recalign_batch_size", "requests per forward pass",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64])

    def reconfigure(self, config: dict) -> None:
        """Serve's user_config ({adapter, adapters, system}, as ServeJob's): the systems are planned again from
        the run and the new default loaded, in place; requests already admitted finish on what they were sent to."""
        job = ServeJob(run_dir=self.run_dir, discover=self.discover, adapter=str(config.get("adapter") or ""),
                       adapters=[str(a) for a in config.get("adapters") or []], system=str(config.get("system") or ""))
        systems, default = plan_systems(job)
        if (systems, default) == (self.served, self.default):
            return
        generation = self.generation + 1
        self._specs[generation] = systems
        self.service, self.default = self._load_service(default, generation), default
        self.generation = generation  # last: a request admitted now sees the new systems whole

    @property
    def served(self) -> dict[str, dict]:
        """The systems of the current config generation."""
        return self._specs[self.generation]

    def _load_service(self, system: str, generation: int) -> RerankService:
        spec = self._specs[generation][system]
        adapter, kind = spec.get("adapter"), spec["kind"]
        loader = (functools.partial(load_policy, self.model_path, adapter, self.rerank_cfg.dtype) if kind != "sasrec"
                  else None)
        name = os.path.basename(self.model_path.rstrip("/")) + (f"+{os.path.basename(adapter)}" if adapter else "")
        name = {"sasrec": "sasrec", "fusion": f"sasrec+{name}"}.get(kind, name)
        return RerankService(self.data.items, loader, self.rerank_cfg, self.prompt_cfg, model_name=name,
                             users=self.users, limits=self.limits,
                             sasrec=self._sasrec_model() if kind != "llm" else None,
                             history_len=self.data.history_len, fusion_weight=spec.get("weight"))

    def _sasrec_model(self):
        """The run's SASRec, loaded once per replica (small; sasrec and fusion share it)."""
        if self._sasrec is None:
            from recalign.recsys.train import load_model

            self._sasrec = load_model(self.sasrec_dir)
        return self._sasrec

    async def _service(self, system: str, generation: int) -> RerankService:
        if system == self.default and generation == self.generation:
            return self.service
        return await self._loaded(f"{generation}:{system}")

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _rerank(self, requests: list[tuple[str, int, ParsedRequest]]) -> list[dict]:
        """(system, generation, request) -> replies, one scorer pass per system in the batch. Torch blocks: it runs
        in a thread so the replica keeps answering (health checks, 4xx) meanwhile."""
        self.batch_size.observe(len(requests))
        replies: list[dict | None] = [None] * len(requests)
        for system, generation in dict.fromkeys((s, g) for s, g, _ in requests):
            rows = [i for i, (s, g, _) in enumerate(requests) if (s, g) == (system, generation)]
            service = await self._service(system, generation)
            for i, reply in zip(rows, await asyncio.to_thread(service.rerank, [requests[i][2] for i in rows])):
                replies[i] = {"system": system, **reply}
        return replies

    @api.post("/v1/rerank", response_model=RerankReply, openapi_extra=REQUEST_SCHEMA,
              responses={code: {"description": why} for code, why in [
                  (401, "no API key"), (403, "wrong API key"), (404, "unknown system or user"),
                  (413, "body too large"), (422, "a field is invalid (named in error.field)"),
                  (503, "overloaded: retry later")]})
    async def rerank(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        system, response = await self._answer(request)
        self.requests.inc(tags={"status": str(response.status_code), "system": system})
        self.latency.observe(time.perf_counter() - start, tags={"system": system})
        return response

    async def _answer(self, request: Request) -> tuple[str, JSONResponse]:
        """(the system that answered, or "-" for a refused request; the response)."""
        request_id = uuid.uuid4().hex
        try:
            if self.keys is not None:
                self.keys.check(request.headers.get("authorization"))
            req = parse_request(read_json(await read_body(request, self.limits.max_body_bytes), self.limits),
                                self.limits)
            system, generation = req.system or self.default, self.generation
            if system not in self.served:
                raise ApiError(404, "system", f"unknown system {short(system)}; this deployment serves "
                                              f"{sorted(self.served)}")
            parsed = self.service.parse(req)
        except ApiError as err:
            return "-", error_reply(err, request_id)
        reply = await self._rerank((system, generation, parsed))
        return system, JSONResponse({"request_id": request_id, **reply})

    @api.get("/v1/systems")
    async def systems(self, request: Request) -> JSONResponse:
        try:
            if self.keys is not None:
                self.keys.check(request.headers.get("authorization"))
        except ApiError as err:
            return error_reply(err, uuid.uuid4().hex)
        return JSONResponse({"default": self.default, "max_candidates": self.limits.max_candidates,
                             "max_history": self.limits.max_history, "systems": [
                                 {"name": name, **spec, "base_model": self.model_path if spec["kind"] != "sasrec"
                                  else None} for name, spec in self.served.items()]})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "system": self.default, "generation": self.generation}

    def check_health(self) -> None:
        """Serve's health check: one tiny forward pass; an exception marks the replica unhealthy."""
        self.service.rerank([self.probe])


def build(cfg: ServeJob):
    data_dir = os.path.join(cfg.run_dir, "data")
    if not io.exists(io.join(data_dir, "meta.json")):
        raise MissingInputError(f"run_dir={cfg.run_dir}: no prepared dataset in {data_dir}; point run_dir at a run "
                                "(`make run` writes runs/demo) or prepare one with jobs/prepare.py")
    plan_systems(cfg)  # errors name the options as the user wrote them
    # Absolute paths: a replica plans its systems again from these (reconfigure), in its own working dir.
    cfg = dataclasses.replace(cfg, run_dir=_absolute(cfg.run_dir),
                              adapter=_absolute(adapter_path(cfg.run_dir, cfg.adapter)) if cfg.adapter else "",
                              adapters=[_absolute(adapter_path(cfg.run_dir, a)) for a in cfg.adapters])
    systems, default = plan_systems(cfg)
    run_dir = cfg.run_dir.rstrip("/")
    models_dir = run_spec(run_dir).models(cfg.models_dir)
    model_path = str(resolve_model(cfg.model, models_dir))
    keys = ApiKeys.load(cfg.auth, cfg.keys_file)
    if keys is None:
        print("recalign serve: auth=none: the endpoint takes requests WITHOUT API keys", file=sys.stderr)
    deployment = Reranker.options(num_replicas=cfg.replicas,
                                  user_config={"adapter": cfg.adapter, "adapters": list(cfg.adapters),
                                               "system": cfg.system}, max_ongoing_requests=cfg.max_ongoing_requests,
                                  max_queued_requests=cfg.max_queued_requests,
                                  backpressure_config=BackpressureConfig(status_code=503,
                                                                         retry_after_s=cfg.retry_after_s),
                                  ray_actor_options={
                                      "num_cpus": cfg.rerank.cpus_per_actor, "num_gpus": cfg.rerank.num_gpus})
    return deployment.bind(data_dir, model_path, systems, default, asdict(cfg.rerank), asdict(run_prompt(cfg.run_dir)),
                           keys.digests if keys else None, asdict(cfg.limits), cfg.max_adapters,
                           os.path.join(cfg.run_dir, "baselines", "sasrec"), cfg.run_dir, cfg.discover)


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
