"""Stage 1 of RLRF4Rec: sample N preference analyses per user with a Ray Data pipeline.

    examples (split) -> select users -> drop users already written
      -> map_batches(PromptBuilder)                    chat-rendered knowledge prompts
      -> map_batches(SamplerStage, ActorPoolStrategy)  N completions per user, one Parquet file per batch
      -> check: exactly N distinct sample_idx per selected user -> meta.json

Re-running skips users that already have N rows, so a killed job resumes where it stopped and a
larger `num_users` extends a smaller run (subsets are nested: the first k of one seeded permutation).
`config.json` pins the settings that shape the samples; resuming with other settings is an error
unless `overwrite=true`. Engine settings (vLLM vs HF, threads, batch sizes) may change between runs:
every row records its engine.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import asdict
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recalign import io
from recalign.config import fingerprint
from recalign.runs import Log
from recalign.sampling.actors import PromptBuilder, SamplerStage, check_samples, read_samples, samples_per_user
from recalign.sampling.config import SampleConfig
from recalign.sampling.engines import Engine, make_engine


def generation_key(cfg: SampleConfig, data_fingerprint: str) -> dict:
    """The settings that shape the samples; rows written under another key must not be mixed in."""
    return {"model": cfg.model, "num_samples": cfg.num_samples, "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed, "split": cfg.split,
            "prompt": asdict(cfg.prompt), "data": data_fingerprint}


def select_users(examples: pa.Table, num_users: int, seed: int) -> pa.Table:
    """All examples (num_users=0) or the first num_users of a seeded permutation, sorted by user_idx."""
    if num_users == 0:
        return examples.sort_by("user_idx")
    users = np.sort(examples["user_idx"].to_numpy())
    if num_users > len(users):
        raise ValueError(f"sample.num_users={num_users} but the split has only {len(users)} users")
    chosen = np.random.default_rng(seed).permutation(users)[:num_users]
    return examples.filter(pc.is_in(examples["user_idx"], pa.array(chosen, examples["user_idx"].type))) \
        .sort_by("user_idx")


def run_sampling(cfg: SampleConfig, data_dir: str, out_dir: str,
                 engine_factory: Callable[[], Engine] | None = None, log: Log = print) -> dict:
    """Sample N analyses for every selected user not yet written; returns the stage summary (meta.json)."""
    import ray

    from recalign.data.dataset import Dataset
    from recalign.llm import resolve_model

    dataset = Dataset(data_dir)
    model_path = resolve_model(cfg.model, cfg.models_dir)  # converts on the driver once, before any actor
    _pin_config(out_dir, generation_key(cfg, dataset.meta["fingerprint"]), cfg.overwrite, log)
    selected = select_users(dataset.examples(cfg.split), cfg.num_users, cfg.subset_seed)
    counts = samples_per_user(read_samples(out_dir))
    done = [u for u in selected["user_idx"].to_pylist() if counts.get(u, 0) == cfg.num_samples]
    todo = selected.filter(pc.invert(pc.is_in(selected["user_idx"], pa.array(done, pa.int32()))))
    log(f"[sample] {selected.num_rows} users selected, {len(done)} already written, {todo.num_rows} to sample "
        f"(N={cfg.num_samples}, model={cfg.model}, engine={cfg.engine.engine}, actors={cfg.num_actors})")

    start = time.perf_counter()
    written = _sample_users(cfg, data_dir, out_dir, model_path, todo, engine_factory, log, ray) if todo.num_rows else {}
    wall = time.perf_counter() - start

    samples = read_samples(out_dir)
    check_samples(samples, selected["user_idx"].to_pylist(), cfg.num_samples)
    mine = samples.filter(pc.is_in(samples["user_idx"], selected["user_idx"]))
    meta = {
        "fingerprint": fingerprint(generation_key(cfg, dataset.meta["fingerprint"])),
        "num_users": selected.num_rows, "num_samples": cfg.num_samples, "num_rows": mine.num_rows,
        "users_sampled_this_run": todo.num_rows, "model": cfg.model, "model_path": model_path,
        "engines": sorted(set(mine["engine"].to_pylist())),
        "finish_reasons": dict(zip(*np.unique(mine["finish_reason"].to_numpy(zero_copy_only=False),
                                              return_counts=True))),
        "mean_response_tokens": float(pc.mean(mine["response_tokens"]).as_py() or 0.0),
        "run_seconds": round(wall, 2), **written,
    }
    io.write_json(meta, io.join(out_dir, "meta.json"))
    log(f"[sample] done: {meta['num_rows']} rows for {meta['num_users']} users in {out_dir}")
    return meta


def _sample_users(cfg: SampleConfig, data_dir: str, out_dir: str, model_path: str, todo: pa.Table,
                  engine_factory: Callable[[], Engine] | None, log: Log, ray) -> dict:
    """Run the Ray Data pipeline over `todo`; logs progress per written batch."""
    from ray.data import ActorPoolStrategy

    if engine_factory is None:
        engine_factory = functools.partial(make_engine, cfg.engine, model_path, cfg.seed)
    users = todo.select(["user_idx", "user_id", "split", "history", "history_ratings"])
    # One block per batch: batches spread over the actor pool, and a retry redoes one batch only.
    blocks = [users.slice(i, cfg.batch_size) for i in range(0, users.num_rows, cfg.batch_size)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(PromptBuilder, fn_constructor_kwargs=dict(data_dir=data_dir, tokenizer_path=model_path,
                                                                  prompt=cfg.prompt),
                        batch_size=cfg.batch_size, compute=ActorPoolStrategy(size=1), num_cpus=0.25)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_restarts / max_task_retries; its extra kwargs are the way.
        # The restarts bound the job; a batch is retried for as long as its actor comes back. A count of retries
        # would not do: when a node is lost, each retry fails at once (ActorUnavailableError) until the head
        # declares the node dead after its missed heartbeats (~15 s), so three are spent before the restart.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            SamplerStage,
            fn_constructor_kwargs=dict(engine_factory=engine_factory, out_dir=out_dir, num_samples=cfg.num_samples,
                                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_p=cfg.top_p, model_name=cfg.model, seed=cfg.seed),
            batch_size=cfg.batch_size, compute=ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.cpus_per_actor, num_gpus=cfg.num_gpus,
            max_restarts=cfg.max_actor_restarts, max_task_retries=-1 if cfg.max_actor_restarts else 0)
    users_done = rows = tokens = 0
    start = time.perf_counter()
    for summary in ds.iter_batches(batch_size=None, batch_format="numpy"):
        users_done += int(summary["num_users"].sum())
        rows += int(summary["num_rows"].sum())
        tokens += int(summary["response_tokens"].sum())
        elapsed = time.perf_counter() - start
        eta = elapsed / users_done * (todo.num_rows - users_done)
        log(f"[sample] {users_done}/{todo.num_rows} users ({100 * users_done / todo.num_rows:.0f}%), {rows} rows, "
            f"{tokens / elapsed:.1f} generated tokens/s, eta {eta:.0f}s")
    return {"generated_tokens_this_run": tokens,
            "tokens_per_second_this_run": round(tokens / max(time.perf_counter() - start, 1e-9), 2)}


def _pin_config(out_dir: str, key: dict, overwrite: bool, log: Log) -> None:
    """Write config.json for a fresh dir; refuse (or, with overwrite, wipe) a dir written under another key."""
    uri = io.join(out_dir, "config.json")
    if io.exists(uri):
        previous = io.read_json(uri)
        if previous.get("key") == key:
            return
        changed = sorted(k for k in set(key) | set(previous.get("key", {}))
                         if key.get(k) != previous.get("key", {}).get(k))
        if not overwrite:
            raise ValueError(f"{out_dir}: samples were written with other settings ({', '.join(changed)} changed); "
                             "set sample.overwrite=true to discard them, or use another run name")
        log(f"[sample] overwrite: discarding {out_dir} (changed: {', '.join(changed)})")
        io.delete(out_dir)
    io.write_json({"key": key, "fingerprint": fingerprint(key)}, uri)
