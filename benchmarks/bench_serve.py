"""The re-ranking endpoint under load on SmolLM2: latency percentiles and throughput at several concurrencies,
beside one bare forward pass of the same prompt measured in the same run.

    python benchmarks/bench_serve.py                         # run_dir=runs/bench (made by jobs/prepare.py), 60 s each
    python benchmarks/bench_serve.py --seconds 20 --concurrency 1,4 --out runs/bench/serve.json

It starts an embedded Ray and the Serve app (serve/app.py, the base model, auth=none) on 127.0.0.1, sends the
same request (a test user's last history items and 20 candidates, the run's re-rank prompt) from C client
threads for --seconds each, and times one bare forward pass of that prompt (LetterScorer, no decode) in this
process before and after the load phases (never during them, the two would share the cores). Goals (issue 13):
p50 at concurrency 1 within 1.2x of the bare forward; throughput at 16 at least 2x that at 1; 0 errors.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request

from common import run_parser  # noqa: E402  (puts the repository on sys.path first)


def parse_args(argv=None) -> argparse.Namespace:
    parser = run_parser(__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seconds", type=float, default=60.0, help="load phase length per concurrency")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--batch-size", type=int, default=8, help="rerank.batch_size: requests per forward pass")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the replica (rerank.threads; Ray "
                                                                 "gives an actor of 1 CPU one OpenMP thread)")
    parser.add_argument("--cpus", type=float, default=2.0, help="Ray CPUs of the replica (rerank.cpus_per_actor)")
    parser.add_argument("--bare-repeats", type=int, default=30)
    parser.add_argument("--out", default="runs/bench/bench_serve.json")
    return parser.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def load_phase(url: str, body: bytes, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client():
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    resp.read()
                    ok = resp.status == 200
                    why = str(resp.status)
            except urllib.error.HTTPError as err:
                ok, why = False, f"{err.code} {err.read()[:200].decode(errors='replace')}"
            except (urllib.error.URLError, OSError) as err:
                ok, why = False, type(err).__name__
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[str(why)] = errors.get(str(why), 0) + 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 3),
            **{f"p{q}_ms": round(1000 * percentile(latencies, q), 1) if latencies else None for q in (50, 95, 99)}}


def bare_forward(scorer, prompt: str, repeats: int) -> float:
    """Median seconds of one forward pass of `prompt` alone (letter logits, no decode)."""
    scorer._score([prompt], generate=False)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer._score([prompt], generate=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from ray import serve

    from launch import RayConfig, ray_session
    from recalign.data.dataset import Dataset
    from recalign import io
    from recalign.llm.convert import resolve_model
    from recalign.llm.policy import load_policy
    from recalign.rerank.scorer import RerankConfig
    from recalign.rerank.service import RerankService
    from serve.app import ServeJob, build, run_prompt, run_spec

    cfg = ServeJob(run_dir=args.run_dir, model=args.model, auth="none", max_ongoing_requests=64,
                   max_queued_requests=256, rerank=RerankConfig(batch_size=args.batch_size, threads=args.threads,
                                                       cpus_per_actor=args.cpus))
    app = build(cfg)
    model_path = str(resolve_model(args.model, run_spec(args.run_dir).models(cfg.models_dir)))
    data = Dataset(os.path.join(args.run_dir, "data"))
    test = data.split("test")
    item_id = data.items["item_id"]
    history = [str(item_id[i]) for i in test.history[0] if i > 0][-10:]
    request = {"history": history, "candidates": [str(item_id[i]) for i in test.candidates[0][:20]]}
    # One copy of the model in this process: it renders the prompt and times the bare forward passes.
    service = RerankService(data.items, functools.partial(load_policy, model_path),
                            RerankConfig(batch_size=args.batch_size), run_prompt(args.run_dir))
    prompt = service.prompt(service.parse(request))
    prompt_tokens = len(service.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    result = {"model": model_path, "prompt_tokens": prompt_tokens, "batch_size": args.batch_size,
              "replica_threads": args.threads, "replica_cpus": args.cpus, "driver_threads": torch.get_num_threads(),
              "seconds_per_phase": args.seconds, "cpus": os.cpu_count(),
              "bare_forward_ms_before": round(1000 * bare_forward(service.scorer, prompt, args.bare_repeats), 1)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with ray_session(RayConfig()):
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        serve.run(app, name="recalign-bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/rerank"
        body = json.dumps(request).encode()
        load_phase(url, body, 1, 5)  # warm-up
        result["phases"] = [load_phase(url, body, int(c), args.seconds) for c in args.concurrency.split(",")]
        serve.shutdown()
    result["bare_forward_ms_after"] = round(1000 * bare_forward(service.scorer, prompt, args.bare_repeats), 1)
    bare = (result["bare_forward_ms_before"] + result["bare_forward_ms_after"]) / 2
    by_c = {p["concurrency"]: p for p in result["phases"]}
    goals = {}
    if 1 in by_c:
        goals["p50_at_1_over_bare"] = round(by_c[1]["p50_ms"] / bare, 2)
    if 1 in by_c and 16 in by_c:
        goals["throughput_16_over_1"] = round(by_c[16]["throughput_rps"] / by_c[1]["throughput_rps"], 2)
    goals["errors"] = sum(sum(p["errors"].values()) for p in result["phases"])
    result["goals"] = goals
    print(json.dumps(result, indent=2))
    io.write_json(result, args.out)  # temp file, then rename
    return result


if __name__ == "__main__":
    main()
