"""The alignment configs: one LoRA policy's training (AlignConfig), which policies the pipeline trains
(PoliciesConfig), and the Ray Tune sweep over beta, the number of negatives and the loss (SweepConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from recalign.align.losses import LOSS_TYPES
from recalign.config import option
from recalign.pairs.build import PATHS

SFT_LOSSES = ("listwise", "nll")
ALL_NEGATIVES = 1 << 20  # a pairs row's whole rejected list


@dataclass
class AlignConfig:
    """One LoRA policy's training. Names follow TRL's DPOConfig and PEFT where the meaning is the same."""

    RENAMED: ClassVar[dict[str, str]] = {
        "lr": "learning_rate", "sft_lr": "sft_learning_rate", "epochs": "num_train_epochs",
        "sft_epochs": "sft_num_train_epochs", "batch_size": "per_device_train_batch_size",
        "grad_accum": "gradient_accumulation_steps", "max_prompt_tokens": "max_prompt_length",
        "max_completion_tokens": "max_completion_length", "precompute_reference": "precompute_ref_log_probs",
        "checkpoint_every": "save_steps", "checkpoints_to_keep": "save_total_limit",
        "target_modules": "lora_target_modules",
        "mixed_precision": "renamed to bf16 (true: matmuls under bfloat16 autocast; false: everything in dtype)",
    }

    loss_type: str = option("sdpo", "dpo (best vs worst: num_negatives=1, as RLRF4Rec) | dpo_pairwise_mean (the mean "
                                    "of K pairwise DPO losses) | dmpo | sdpo")
    beta: float = option(1.0, "implicit-reward scale; S-DPO uses 1.0, DPO papers often 0.1")
    num_negatives: int = option(3, "K rejected completions per prompt (the first K of each pairs row)")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA scaling numerator (scale = lora_alpha / lora_r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] = option(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                             "down_proj"], help="modules that get a LoRA adapter")
    learning_rate: float = option(1e-4, "AdamW learning rate of the preference phase")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(0, "linear learning-rate warm-up (optimizer steps) at the start of each phase")
    max_grad_norm: float = option(1.0, "gradient clipping; 0 = off")
    num_train_epochs: int = option(1, "preference epochs over the pairs")
    max_steps: int = option(0, "> 0: preference optimizer steps instead of num_train_epochs")
    max_examples: int = option(0, "> 0: train on a seeded random subset of this many pairs (0 = every pair)")
    per_device_train_batch_size: int = option(2, "examples per worker micro-batch (each has 1 + K completions)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    sft_num_train_epochs: int = option(0, "SFT warm-up epochs on the chosen completions before the preference phase")
    sft_max_steps: int = option(0, "> 0: SFT optimizer steps instead of sft_num_train_epochs")
    sft_learning_rate: float = option(1e-4, "AdamW learning rate of the SFT warm-up")
    sft_max_examples: int = option(0, "the pipeline's SFT policy: > 0 trains on a seeded subset of this many SFT "
                                      "examples, 0 on every one (max_examples then bounds the preference pairs)")
    sft_loss: str = option("listwise", "SFT loss: listwise (softmax cross-entropy over each example's completions, "
                                       "the chosen the label: for re-rank letters a softmax over the C candidates' "
                                       "letter logits, LlamaRec) | nll (token-mean NLL of the chosen completion)")
    max_prompt_length: int = option(1536, "prompt tokens kept; a longer prompt keeps its end (the assistant header)")
    max_completion_length: int = option(256, "completion tokens kept; a longer completion keeps its start")
    prompt_sharing: str = option("packed", "the prompt encoded once for its 1 + K completions: packed (block mask) "
                                 "| kv_cache (expanded KV; attention kernels without 4D masks) | none (K + 1 full "
                                 "sequences)")
    precompute_ref_log_probs: bool = option(False, "reference log-probs once before the preference phase, not "
                                                   "every step (always so when starting from an adapter)")
    dtype: str = option("auto", "model weights: auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16")
    bf16: bool = option(False, "matmuls under torch.autocast in bfloat16, weights stay in dtype (~1.9x the fp32 "
                               "matmul rate on CPUs with AVX512-BF16)")
    save_steps: int = option(50, "optimizer steps between adapter checkpoints (the last step always checkpoints)")
    save_total_limit: int = option(2, "checkpoints kept in the run storage")
    seed: int = option(0, "LoRA init and data order")
    num_workers: int = option(2, "Ray Train workers (DDP)")
    use_gpu: bool = option(False, "one GPU per worker, NCCL; else gloo on CPU")
    cpus_per_worker: float = option(1.0, "CPU workers' Ray resources (and torch threads)")
    max_failures: int = option(2, "worker-group restarts from the last checkpoint before the run fails")

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.sft_loss not in SFT_LOSSES:
            raise ValueError(f"sft_loss must be one of {SFT_LOSSES}, got {self.sft_loss!r}")
        if self.prompt_sharing not in ("packed", "kv_cache", "none"):
            raise ValueError(f"prompt_sharing must be packed, kv_cache or none, got {self.prompt_sharing!r}")
        if self.loss_type == "dpo" and self.num_negatives != 1:
            raise ValueError(f"loss_type=dpo is best vs worst (num_negatives=1), got num_negatives={self.num_negatives}; "
                             "for K > 1 use dpo_pairwise_mean, dmpo or sdpo")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        for name in ("max_examples", "sft_max_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_negatives", "per_device_train_batch_size", "gradient_accumulation_steps", "save_steps",
                     "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.num_train_epochs < 1 and self.max_steps < 1 and self.sft_num_train_epochs < 1
                and self.sft_max_steps < 1):
            raise ValueError("set num_train_epochs >= 1 or max_steps >= 1 (both 0 with an SFT warm-up trains an "
                             "SFT-only policy)")

    @property
    def negatives_loaded(self) -> int:
        """Rejected completions read per pairs row: every one for a listwise SFT phase (the softmax runs over all
        of them; the preference phase then takes the first num_negatives), else num_negatives."""
        listwise = self.sft_loss == "listwise" and (self.sft_num_train_epochs > 0 or self.sft_max_steps > 0)
        return ALL_NEGATIVES if listwise else self.num_negatives


def _rerank_default() -> AlignConfig:
    return AlignConfig(sft_num_train_epochs=1)


@dataclass
class PoliciesConfig:
    paths: list[str] = option(factory=lambda: list(PATHS), help="pair sets that get policies")
    loss_types: list[str] = option(factory=lambda: ["dpo", "dmpo", "sdpo"], help="one policy per loss type and "
                                   "path; dpo trains best vs worst (K=1), the others on the path's num_negatives")
    rerank: AlignConfig = option(factory=_rerank_default, help="re-rank path; its sft_num_train_epochs / "
                                                               "sft_max_steps train the SFT policy (both 0: no SFT "
                                                               "policy)")
    knowledge: AlignConfig = option(factory=AlignConfig, help="knowledge path; SFT fields ignored")
    from_sweep: bool = option(False, "re-rank policies take beta and num_negatives from <run>/sweep/best.json")

    def __post_init__(self) -> None:
        if not self.paths or set(self.paths) - set(PATHS):
            raise ValueError(f"paths must be a non-empty subset of {list(PATHS)}, got {self.paths}")
        if set(self.loss_types) - set(LOSS_TYPES):
            raise ValueError(f"loss_types must be among {list(LOSS_TYPES)}, got {self.loss_types}")



@dataclass
class SweepConfig:
    search: str = option("grid", "grid: every combination below | random: num_samples draws")
    loss_types: list[str] = option(factory=lambda: ["dmpo", "sdpo"], help="searched loss types (at K=1 both are DPO; "
                                   "dpo itself only takes K=1)")
    betas: list[float] = option(factory=lambda: [0.1, 1.0], help="grid values of beta")
    num_negatives: list[int] = option(factory=lambda: [1, 3], help="grid values of K")
    beta_range: list[float] = option(factory=lambda: [0.05, 2.0], help="random search: log-uniform beta bounds")
    num_samples: int = option(1, "grid: repeats of the whole grid; random: number of trials")
    rungs: int = option(2, "epochs per trial; ASHA may stop a trial after any rung")
    grace_period: int = option(1, "ASHA: rungs every trial runs before it can be stopped")
    reduction_factor: int = option(2, "ASHA: keep the top 1/reduction_factor at each rung")
    max_concurrent: int = option(1, "trials at once (each runs a TorchTrainer of align.num_workers workers)")
    max_failures: int = option(2, "retries of a failed trial within the sweep, each from its last reported rung; "
                                  "a trial that fails more often errors (running the sweep again resumes it)")
    valid_users: int = option(64, "seeded subset of validation users the re-ranker is scored on; 0 = all")
    seed: int = option(0, "validation subset and random search")

    def __post_init__(self) -> None:
        if set(self.loss_types) - set(LOSS_TYPES):
            raise ValueError(f"loss_types must be among {list(LOSS_TYPES)}, got {self.loss_types}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        if "dpo" in self.loss_types and set(self.num_negatives) - {1}:
            raise ValueError("sweep.loss_types has dpo, which takes K=1 only, but num_negatives has "
                             f"{self.num_negatives}: search dmpo/sdpo (DPO at K=1) or dpo_pairwise_mean")
