"""The sampling stage's config: which model writes how many analyses of which users, and on what engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from recalign.data.protocol import SPLITS
from recalign.prompts import PromptConfig
from recalign.sampling.engines import EngineConfig

MAX_SAMPLES = 16


@dataclass
class SampleConfig:
    model: str = "smollm2"  # "smollm2" (embedded default, converted once), a .gguf file, or a local HF folder
    models_dir: str = "models"  # where converted checkpoints are kept
    num_samples: int = 4  # N: analyses sampled per user (1..16)
    max_new_tokens: int = 160  # completion budget; the prompt asks for one short paragraph
    temperature: float = 0.8  # > 0 so the N samples differ (pairs need best vs worst); 0 = greedy, N must be 1
    top_p: float = 0.95
    seed: int = 0  # engine seed, set once per engine and recorded in every row
    num_users: int = 0  # users to sample: 0 = all, else a seeded random subset of this size
    subset_seed: int = 0  # seeds the subset; subsets of one seed are nested (32 users are in the 64)
    split: str = "train"  # whose example history builds the prompt (train keeps valid/test targets out)
    num_actors: int = 1  # sampler actors (one engine each)
    batch_size: int = 16  # users per batch; each batch is one generate call and one Parquet file
    cpus_per_actor: float = 1.0  # Ray CPUs reserved per sampler actor
    num_gpus: float = 0.0  # Ray GPUs per sampler actor (GPU nodes: engine.tensor_parallel_size)
    max_actor_restarts: int = 3  # a sampler actor that dies more often fails the job instead of looping
    overwrite: bool = False  # discard samples written with other settings instead of failing
    prompt: PromptConfig = field(default_factory=PromptConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.num_samples <= MAX_SAMPLES:
            raise ValueError(f"num_samples must be in 1..{MAX_SAMPLES}, got {self.num_samples}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError("temperature must be >= 0, top_p in (0, 1] and max_new_tokens >= 1")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError("temperature=0 (greedy) would give num_samples identical samples; use num_samples=1")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.num_users < 0 or self.num_actors < 1 or self.batch_size < 1 or self.max_actor_restarts < 0:
            raise ValueError("num_users >= 0, num_actors >= 1, batch_size >= 1, max_actor_restarts >= 0 required")
