"""The pipeline's alignment stage: which LoRA policies are trained, in which order, on which pairs.

    rerank path:    sft            (SFT first, as S-DPO and DMPO do: listwise over the letters of the
                                    sliding-window set pairs/rerank_sft.parquet when the run has one)
                    sft+<loss>     for each loss type, starting from the SFT adapter, which is also the reference
    knowledge path: <loss>         for each loss type, from the base model (RLRF4Rec aligns it directly)

Each policy is its own skip-if-done stage under policy/<path>/<label>/ (see `policy_stage`), so a
re-run after a crash retrains only what is missing, and the SFT policy is trained once, not once
per loss type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

from recalign import io
from recalign.align.config import AlignConfig, PoliciesConfig
from recalign.align.trainer import ADAPTER_FILES, train_policy
from recalign.config import fingerprint
from recalign.errors import MissingInputError
from recalign.pairs.stage import rerank_prompt, sft_pairs
from recalign.runs import Log, RunSpec, learning_key, run_stage, slug
from recalign.tracking import MlflowTarget


def plan_policies(cfg: PoliciesConfig, sweep_best: AlignConfig | None = None) -> list[tuple[str, AlignConfig, str]]:
    """(label, config, init label) per policy in training order; labels are '<path>/<name>', init '' = none."""
    plan = []
    for path in cfg.paths:
        align = cfg.rerank if path == "rerank" else cfg.knowledge
        if path == "rerank" and sweep_best is not None:
            align = dataclasses.replace(align, beta=sweep_best.beta, num_negatives=sweep_best.num_negatives)
        init = ""
        if path == "rerank" and (align.sft_num_train_epochs or align.sft_max_steps):
            # The SFT policy reads only the chosen completions: fix the preference-only fields so that
            # changing beta, K or the loss never retrains it.
            sft = dataclasses.replace(align, num_train_epochs=0, max_steps=0, loss_type="dpo", beta=1.0,
                                      num_negatives=1, max_examples=align.sft_max_examples, sft_max_examples=0)
            plan.append((f"{path}/sft", sft, ""))
            init = f"{path}/sft"
        preference = dataclasses.replace(align, sft_num_train_epochs=0, sft_max_steps=0, sft_max_examples=0)
        for loss_type in cfg.loss_types:
            label = f"sft+{loss_type}" if init else loss_type
            k = 1 if loss_type == "dpo" else preference.num_negatives  # DPO is best vs worst
            plan.append((f"{path}/{label}", dataclasses.replace(preference, loss_type=loss_type, num_negatives=k), init))
    return plan


def policies_stage(run: RunSpec, cfg: PoliciesConfig, model_path: str, log: Log = print,
                   force: bool = False, tracking: MlflowTarget | None = None) -> dict[str, Any]:
    """Train every planned policy that is not up to date; returns their summaries by label.
    `tracking`: where they log to MLflow (`recalign.tracking.mlflow_target` of the job's config); None = nowhere."""
    sweep_best = None
    if cfg.from_sweep:
        from recalign.align.sweep import load_best

        sweep_best = load_best(run.dir("sweep"))
        log(f"[align] from the sweep: beta={sweep_best.beta:g}, num_negatives={sweep_best.num_negatives}")
    plan = plan_policies(cfg, sweep_best)
    # Re-rank prompts with collaborative tokens (pairs.prompt.item_tokens) embed the run's SASRec items.
    collab = "rerank" in cfg.paths and rerank_prompt(run).item_tokens != "none"
    sasrec = run.dir("baselines", "sasrec")
    if collab and not io.exists(io.join(sasrec, "model.pt")):
        raise MissingInputError(f"{sasrec}/model.pt: missing; the re-rank prompt has collaborative tokens "
                                f"(item_tokens={rerank_prompt(run).item_tokens}): run the sasrec stage first")
    summaries = {}
    for number, (label, align, init) in enumerate(plan, start=1):
        path = label.split("/")[0]
        pairs = sft_pairs(run) if label == f"{path}/sft" else run.dir("pairs", f"{path}.parquet")
        if not io.exists(pairs):
            raise MissingInputError(f"{pairs}: missing; run the pairs stage first (or drop {path!r} from "
                                    "policies.paths)")
        log(f"[align] policy {number}/{len(plan)}: {label}")
        summaries[label] = policy_stage(run, align, model_path, [pairs], log, force, name=label,
                                        init_adapter=run.dir("policy", *init.split("/")) if init else "",
                                        tracking=tracking, item_table=sasrec if collab and path == "rerank" else "")
    return summaries


def policy_key(cfg: AlignConfig, model_path: str, pairs_uris: list[str], init_adapter: str = "",
               item_table: str = "") -> str:
    """Fingerprint of everything the published policy depends on (not workers, fault tolerance or tracking:
    MLflow settings are no AlignConfig field, they reach `policy_stage` beside it); the SASRec weights when the
    prompts have collaborative tokens."""
    train = learning_key(cfg)
    config = io.join(model_path if "://" in model_path else os.path.abspath(model_path), "config.json")
    model = hashlib.sha256(io.read_bytes(config)).hexdigest()
    pairs = [hashlib.sha256(io.read_bytes(u)).hexdigest() for u in pairs_uris]
    init = hashlib.sha256(io.read_bytes(io.join(init_adapter, ADAPTER_FILES[1]))).hexdigest() if init_adapter else ""
    key = {"train": train, "model": model, "pairs": pairs, "init": init}
    if item_table:
        key["items"] = hashlib.sha256(io.read_bytes(io.join(item_table, "model.pt"))).hexdigest()
    return fingerprint(key)


def policy_stage(run: RunSpec, cfg: AlignConfig, model_path: str, pairs_uris: list[str], log: Log = print,
                 force: bool = False, name: str = "", init_adapter: str = "",
                 tracking: MlflowTarget | None = None, item_table: str = "") -> dict[str, Any]:
    """`runs/<name>/policy/<name or loss_type>/`, skipped when up to date; Ray storage under `runs/<name>/ray`.

    `name` may hold a slash (`rerank/sft+sdpo`): the pipeline keeps one folder per path and policy.
    `tracking`: where the training logs to MLflow; None = nowhere.
    """
    label = name or cfg.loss_type
    key = policy_key(cfg, model_path, pairs_uris, init_adapter, item_table)
    out_dir = run.dir("policy", *label.split("/"))

    def train() -> dict[str, Any]:
        summary = train_policy(cfg, model_path, pairs_uris, out_dir, storage_path=run.dir("ray"),
                               name=f"policy-{slug(label)}-{key}", log=log,
                               init_adapter=init_adapter, tracking=tracking, item_table=item_table)
        return {k: summary[k] for k in ("loss_type", "num_negatives", "examples", "steps", "sft_steps", "starts",
                                        "seconds", "final")}

    return run_stage(f"policy/{label}", out_dir, key, train, log, force)
