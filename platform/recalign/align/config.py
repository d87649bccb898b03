"""The alignment configs: one LoRA policy's training (AlignConfig), which policies the pipeline trains
(PoliciesConfig), and the Ray Tune sweep over beta, the number of negatives and the loss (SweepConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

from recalign.align.losses import LOSS_TYPES
from recalign.pairs.build import PATHS


@dataclass
class AlignConfig:
    loss_type: str = "sdpo"  # dpo (mean of the K pairwise losses) | dmpo | sdpo
    beta: float = 1.0  # implicit-reward scale; S-DPO uses 1.0, DPO papers often 0.1
    num_negatives: int = 3  # K rejected completions per prompt (the first K of each pairs row)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (scale = lora_alpha / lora_r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    target_modules: list[str] = field(default_factory=lambda: [  # modules that get a LoRA adapter
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lr: float = 1e-4  # AdamW learning rate of the preference phase
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up (optimizer steps) at the start of each phase
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off
    epochs: int = 1  # preference epochs over the pairs
    max_steps: int = 0  # > 0: preference optimizer steps instead of `epochs`
    max_examples: int = 0  # > 0: train on a seeded random subset of this many pairs (0 = every pair)
    batch_size: int = 2  # examples per worker micro-batch (each has 1 + K completions)
    grad_accum: int = 1  # micro-batches per optimizer step
    sft_epochs: int = 0  # SFT warm-up epochs on the chosen completions before the preference phase
    sft_max_steps: int = 0  # > 0: SFT optimizer steps instead of `sft_epochs`
    sft_lr: float = 1e-4  # AdamW learning rate of the SFT warm-up
    max_prompt_tokens: int = 1536  # longer prompts keep their end (the assistant header)
    max_completion_tokens: int = 256  # longer completions keep their start
    prompt_sharing: str = "packed"  # prompt encoded once for its 1 + K completions: packed (block mask) |
    #   kv_cache (expanded KV; for attention kernels without 4D masks) | none (K + 1 full sequences)
    precompute_reference: bool = False  # reference log-probs once before the preference phase, not every step
    dtype: str = "auto"  # model weights: auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16
    mixed_precision: str = "no"  # bf16: matmuls under torch.autocast in bfloat16, weights stay in `dtype` (~1.9x
    #   the fp32 matmul rate on CPUs with AVX512-BF16); no: everything in `dtype`
    checkpoint_every: int = 50  # optimizer steps between adapter checkpoints (the last step always checkpoints)
    checkpoints_to_keep: int = 2  # checkpoints kept in the run storage
    seed: int = 0  # LoRA init and data order
    num_workers: int = 2  # Ray Train workers (DDP)
    use_gpu: bool = False  # one GPU per worker, NCCL; else gloo on CPU
    cpus_per_worker: float = 1.0  # CPU workers' Ray resources (and torch threads)
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.prompt_sharing not in ("packed", "kv_cache", "none"):
            raise ValueError(f"prompt_sharing must be packed, kv_cache or none, got {self.prompt_sharing!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be no or bf16, got {self.mixed_precision!r}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")
        for name in ("num_negatives", "batch_size", "grad_accum", "checkpoint_every", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 1 and self.max_steps < 1 and self.sft_epochs < 1 and self.sft_max_steps < 1:
            raise ValueError("set epochs >= 1 or max_steps >= 1 (epochs=0 and max_steps=0 with an SFT warm-up "
                             "trains an SFT-only policy)")



def _rerank_default() -> AlignConfig:
    return AlignConfig(sft_epochs=1)


@dataclass
class PoliciesConfig:
    paths: list[str] = field(default_factory=lambda: list(PATHS))  # pair sets that get policies
    loss_types: list[str] = field(default_factory=lambda: list(LOSS_TYPES))  # one policy per loss type and path
    # Re-rank path; its sft_epochs / sft_max_steps train the SFT policy (0 and 0: no SFT policy).
    rerank: AlignConfig = field(default_factory=_rerank_default)
    knowledge: AlignConfig = field(default_factory=AlignConfig)  # knowledge path; SFT fields ignored
    from_sweep: bool = False  # re-rank policies take beta and num_negatives from <run>/sweep/best.json

    def __post_init__(self) -> None:
        if not self.paths or set(self.paths) - set(PATHS):
            raise ValueError(f"paths must be a non-empty subset of {list(PATHS)}, got {self.paths}")
        if set(self.loss_types) - set(LOSS_TYPES):
            raise ValueError(f"loss_types must be among {list(LOSS_TYPES)}, got {self.loss_types}")



@dataclass
class SweepConfig:
    search: str = "grid"  # grid: every combination below | random: num_samples draws
    loss_types: list[str] = field(default_factory=lambda: ["dpo", "dmpo", "sdpo"])  # searched loss types
    betas: list[float] = field(default_factory=lambda: [0.1, 1.0])  # grid values of beta
    num_negatives: list[int] = field(default_factory=lambda: [1, 3])  # grid values of K
    beta_range: list[float] = field(default_factory=lambda: [0.05, 2.0])  # random search: log-uniform beta bounds
    num_samples: int = 1  # grid: repeats of the whole grid; random: number of trials
    rungs: int = 2  # epochs per trial; ASHA may stop a trial after any rung
    grace_period: int = 1  # ASHA: rungs every trial runs before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the top 1/reduction_factor at each rung
    max_concurrent: int = 1  # trials at once (each runs a TorchTrainer of align.num_workers workers)
    valid_users: int = 64  # seeded subset of validation users the re-ranker is scored on; 0 = all
    seed: int = 0  # validation subset and random search
