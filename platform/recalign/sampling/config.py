"""The sampling stage's config: which model writes how many analyses of which users, and on what engine."""

from __future__ import annotations

from dataclasses import dataclass

from recalign.config import option
from recalign.data.protocol import SPLITS
from recalign.prompts import PromptConfig
from recalign.sampling.engines import EngineConfig

MAX_SAMPLES = 16


@dataclass
class SampleConfig:
    model: str = option("smollm2", "\"smollm2\" (embedded default, converted once), a .gguf file, or a local HF folder")
    models_dir: str = option("models", "where converted checkpoints are kept")
    num_samples: int = option(4, "N: analyses sampled per user (1..16)")
    max_new_tokens: int = option(160, "completion budget; the prompt asks for one short paragraph")
    temperature: float = option(0.8, "> 0 so the N samples differ (pairs need best vs worst); 0 = greedy, N must be 1")
    top_p: float = option(0.95, "nucleus sampling: the smallest set of tokens whose probability reaches top_p")
    seed: int = option(0, "sampling seed: each batch is drawn under a hash of it and the batch's users "
                          "(recorded in every row), whichever actor draws it")
    num_users: int = option(0, "users to sample: 0 = all, else a seeded random subset of this size")
    subset_seed: int = option(0, "seeds the subset; subsets of one seed are nested (32 users are in the 64)")
    split: str = option("train", "whose example history builds the prompt of the N analyses that are rewarded "
                                 "(train keeps valid/test targets out)")
    cutoff_samples: int = option(1, "analyses per user written at the cutoff example's history, which train the "
                                    "reward model on the items after the cut-off; 0 = none (the reward model then "
                                    "never reads an analysis)")
    cutoff_users: int = option(0, "users who get cutoff analyses: 0 = the same users as num_users, else a seeded "
                                  "subset of this size from the same permutation (so it holds the num_users users "
                                  "when larger)")
    num_actors: int = option(1, "sampler actors (one engine each)")
    batch_size: int = option(16, "users per batch; each batch is one generate call and one Parquet file")
    cpus_per_actor: float = option(1.0, "Ray CPUs reserved per sampler actor")
    num_gpus: float = option(0.0, "Ray GPUs per sampler actor (GPU nodes: engine.tensor_parallel_size)")
    max_actor_restarts: int = option(3, "a sampler actor that dies more often fails the job instead of looping")
    overwrite: bool = option(False, "discard samples written with other settings instead of failing")
    prompt: PromptConfig = option(factory=PromptConfig, help="the knowledge prompt: history shown, ratings, genres")
    engine: EngineConfig = option(factory=EngineConfig, help="generation engine (vLLM or transformers) and its "
                                                             "settings")

    def __post_init__(self) -> None:
        if not 1 <= self.num_samples <= MAX_SAMPLES:
            raise ValueError(f"num_samples must be in 1..{MAX_SAMPLES}, got {self.num_samples}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError("temperature must be >= 0, top_p in (0, 1] and max_new_tokens >= 1")
        if self.temperature == 0 and max(self.num_samples, self.cutoff_samples) > 1:
            raise ValueError("temperature=0 (greedy) would give identical samples; use num_samples=1 and "
                             "cutoff_samples <= 1")
        if not 0 <= self.cutoff_samples <= MAX_SAMPLES or self.cutoff_users < 0:
            raise ValueError(f"cutoff_samples must be in 0..{MAX_SAMPLES} and cutoff_users >= 0")
        if self.split == "cutoff" and self.cutoff_samples:
            raise ValueError("split=cutoff: the cutoff analyses are set by cutoff_samples and cutoff_users")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.num_users < 0 or self.num_actors < 1 or self.batch_size < 1 or self.max_actor_restarts < 0:
            raise ValueError("num_users >= 0, num_actors >= 1, batch_size >= 1, max_actor_restarts >= 0 required")
