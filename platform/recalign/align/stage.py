"""The pipeline's alignment stage: which LoRA policies are trained, in which order, on which pairs.

    rerank path:    sft            (SFT on the chosen answers, as S-DPO and DMPO do first)
                    sft+<loss>     for each loss type, starting from the SFT adapter, which is also the reference
    knowledge path: <loss>         for each loss type, from the base model (RLRF4Rec aligns it directly)

Each policy is its own skip-if-done stage under policy/<path>/<label>/ (see `policy_stage`), so a
re-run after a crash retrains only what is missing, and the SFT policy is trained once, not once
per loss type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from recalign.align.trainer import AlignConfig, policy_stage
from recalign.align.losses import LOSS_TYPES
from recalign.pairs.build import PATHS


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


def plan_policies(cfg: PoliciesConfig, sweep_best: AlignConfig | None = None) -> list[tuple[str, AlignConfig, str]]:
    """(label, config, init label) per policy in training order; labels are '<path>/<name>', init '' = none."""
    plan = []
    for path in cfg.paths:
        align = cfg.rerank if path == "rerank" else cfg.knowledge
        if path == "rerank" and sweep_best is not None:
            align = dataclasses.replace(align, beta=sweep_best.beta, num_negatives=sweep_best.num_negatives)
        init = ""
        if path == "rerank" and (align.sft_epochs or align.sft_max_steps):
            # The SFT policy reads only the chosen completions: fix the preference-only fields so that
            # changing beta, K or the loss never retrains it.
            sft = dataclasses.replace(align, epochs=0, max_steps=0, loss_type="dpo", beta=1.0, num_negatives=1)
            plan.append((f"{path}/sft", sft, ""))
            init = f"{path}/sft"
        preference = dataclasses.replace(align, sft_epochs=0, sft_max_steps=0)
        for loss_type in cfg.loss_types:
            label = f"sft+{loss_type}" if init else loss_type
            plan.append((f"{path}/{label}", dataclasses.replace(preference, loss_type=loss_type), init))
    return plan


def policies_stage(run, cfg: PoliciesConfig, model_path: str, log: Callable[[str], None] = print,
                   force: bool = False) -> dict[str, Any]:
    """Train every planned policy that is not up to date; returns their summaries by label."""
    from recalign import io

    sweep_best = None
    if cfg.from_sweep:
        from recalign.align.sweep import load_best

        sweep_best = load_best(run.dir("sweep"))
        log(f"[align] from the sweep: beta={sweep_best.beta:g}, num_negatives={sweep_best.num_negatives}")
    plan = plan_policies(cfg, sweep_best)
    summaries = {}
    for number, (label, align, init) in enumerate(plan, start=1):
        path = label.split("/")[0]
        pairs = run.dir("pairs", f"{path}.parquet")
        if not io.exists(pairs):
            raise FileNotFoundError(f"{pairs}: missing; run the pairs stage first (or drop {path!r} from "
                                    "policies.paths)")
        log(f"[align] policy {number}/{len(plan)}: {label}")
        summaries[label] = policy_stage(run, align, model_path, [pairs], log, force, name=label,
                                        init_adapter=run.dir("policy", *init.split("/")) if init else "")
    return summaries
