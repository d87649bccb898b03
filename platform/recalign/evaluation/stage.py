"""The final evaluation: every system on the protocol's test split, with CIs against SASRec, and plots.

Systems:
- random, popularity, SASRec (every test user);
- KA-SASRec fed no knowledge (every test user), and fed each LLM's greedy preference analysis of the
  user's test history: the base LLM (unaligned) and the knowledge-path policies (DPO, DMPO, S-DPO);
- the direct LLM re-ranker (letter logits): zero-shot, after SFT, after SFT + DPO / DMPO / S-DPO,
  with free-generation ValidRatio and HR@1 over all rows and over valid rows;
- fusion: SASRec + w * the letter logits of the re-ranker with the best validation NDCG@10, w chosen on
  `valid_users` validation users (recalign.rerank.fusion). Those users' metrics of SASRec, every
  re-ranker and fusion go to eval/validation.json, where the endpoint finds its default system.
LLM-based systems run on a seeded subset of test users when `llm_users` > 0 (the table says so); the
CI against SASRec then uses the rows both share. Each system's per-row metrics are cached under
eval/systems/ by fingerprint, so an interrupted evaluation resumes with the systems it lacks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from recalign import io, metrics
from recalign.config import fingerprint, to_dict
from recalign.data.dataset import Dataset
from recalign.evaluation.compare import compare_systems
from recalign.evaluation.config import FinalEvalConfig
from recalign.llm.collab import has_projector, prompt_for
from recalign.llm.policy import load_policy, model_fingerprint
from recalign.pairs.stage import rerank_prompt
from recalign.prompts import PromptConfig
from recalign.rerank.fusion import choose_weight, fuse
from recalign.rerank.scorer import build_prompts, free_generation_metrics, score_rows_with_ray
from recalign.errors import MissingInputError
from recalign.runs import MARKER, Log, RunSpec, fingerprint_of, input_key, run_at, slug
from recalign.sampling.engines import EngineConfig
from recalign.sampling.stage import knowledge_prompt, sampled_users
from recalign.systems import baseline_systems, summarise

LOSS_ORDER = ("sft", "dpo", "dmpo", "sdpo")
NO_KNOWLEDGE = "ka-sasrec (no knowledge)"
FUSION = "fusion"
# Bumped when what an LLM system's cache entry holds changes (2: the per-row letter logits, which fusion reads).
LLM_CACHE_FORMAT = 2


@dataclass
class Policy:
    """An LLM to evaluate: the base model (adapter None) or a LoRA adapter on it."""

    name: str  # system name in the table, e.g. "llm sft+sdpo"
    adapter: str | None  # adapter folder (PEFT format), None = the base model
    key: str = ""  # fingerprint of the adapter's stage (cache key)
    prompt: PromptConfig | None = None  # the re-rank prompt it was trained on; None: the evaluated run's


def llm_rows(data: Dataset, split: str, num_users: int, seed: int, exclude: set[int] = frozenset()) -> np.ndarray:
    """Rows of `split` for the LLM systems: a seeded subset of `num_users` users (0 = all) among those not in
    `exclude` (the sampled users, whose analyses trained the reward model and the knowledge policies)."""
    from recalign.sampling.pipeline import select_users

    examples = data.examples(split)
    user_idx = examples["user_idx"].to_numpy()
    eligible = examples.filter(np.isin(user_idx, sorted(exclude), invert=True))
    if eligible.num_rows == 0:
        raise ValueError(f"no {split} user is left once the {len(exclude)} sampled users are excluded")
    chosen = set(select_users(eligible, min(num_users, eligible.num_rows), seed)["user_idx"].to_pylist())
    return np.array([i for i, u in enumerate(user_idx.tolist()) if u in chosen], dtype=np.int64)


def _system_uri(run: RunSpec, name: str) -> str:
    return run.dir("eval", "systems", slug(name) + ".json")


def _is_cached(run: RunSpec, name: str, key: str) -> bool:
    uri = _system_uri(run, name)
    return io.exists(uri) and io.read_json(uri).get("key") == key


def _cached(run: RunSpec, name: str, key: str, compute: Callable[[], dict], log: Log) -> dict:
    """Per-system results under eval/systems/<name>.json, recomputed only when `key` changes."""
    uri = _system_uri(run, name)
    cached = io.read_json(uri) if io.exists(uri) else {}
    if cached.get("key") == key:
        log(f"[evaluate] {name}: cached")
        return cached
    log(f"[evaluate] {name}: scoring")
    result = {"key": key, **compute()}
    io.write_json(result, uri)
    return result


def _metric_rows(scores: np.ndarray, target_index: np.ndarray, rows: np.ndarray, names) -> dict:
    values = metrics.compute(scores, target_index, names)
    return {"rows": rows.tolist(), "metrics": {k: v.tolist() for k, v in values.items()}}


def discover_policies(run: RunSpec) -> tuple[list[Policy], list[Policy]]:
    """The finished policies of a run: (re-rank LLMs, knowledge LLMs), the base model first in both.

    Re-rank policies live in policy/rerank/<label> (sft, sft+dpo, ...), knowledge policies in
    policy/knowledge/<label>; a folder counts once its stage marker is written.
    """
    import pyarrow.fs as pafs

    def found(path: str) -> list[Policy]:
        fs, root = io.resolve(run.dir("policy", path))
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        labels = [i.base_name for i in infos if i.type == pafs.FileType.Directory
                  and io.exists(run.dir("policy", path, i.base_name, MARKER))]
        labels.sort(key=lambda label: ([LOSS_ORDER.index(p) if p in LOSS_ORDER else len(LOSS_ORDER)
                                        for p in label.split("+")], label))
        return [Policy(label, run.dir("policy", path, label), fingerprint_of(run.dir("policy", path, label)))
                for label in labels]

    rerank = [Policy("llm zero-shot", None)] + [Policy(f"llm {p.name}", p.adapter, p.key) for p in found("rerank")]
    knowledge = [Policy("base", None)] + found("knowledge")
    return rerank, knowledge


def transferred_policies(cfg: FinalEvalConfig) -> list[Policy]:
    """`cfg.transfer_from`'s finished re-rank policies (not its zero-shot: the base model is this run's own), or
    those of `cfg.transfer_policies`, each named "llm <label> (from <run>)" and carrying its run's prompt."""
    if not cfg.transfer_from:
        return []
    source = run_at(cfg.transfer_from)
    found = discover_policies(source)[0][1:]
    labels = [p.name.removeprefix("llm ") for p in found]
    missing = [label for label in cfg.transfer_policies if label not in labels]
    if missing or not found:
        raise MissingInputError(f"eval.transfer_from={cfg.transfer_from}: no finished re-rank policy "
                                f"{', '.join(missing) or ''} under {source.dir('policy', 'rerank')} (it has "
                                f"{', '.join(labels) or 'none'}); run that run's align stage or set "
                                "eval.transfer_policies")
    prompt = rerank_prompt(source)
    return [Policy(f"{p.name} (from {source.name})", p.adapter, p.key, prompt) for p, label in zip(found, labels)
            if not cfg.transfer_policies or label in cfg.transfer_policies]


def run_rerank_prompt(run: RunSpec, cfg: FinalEvalConfig) -> PromptConfig:
    """The prompt of this run's own re-rankers (zero-shot among them): its pairs stage's; a run without one that
    scores another run's policies (transfer_from) prompts zero-shot as those were trained, so they compare."""
    if cfg.transfer_from and not io.exists(run.dir("pairs", "config.json")):
        return rerank_prompt(run_at(cfg.transfer_from))
    return rerank_prompt(run)


def evaluate_stage(run: RunSpec, cfg: FinalEvalConfig, model_path: str, engine: EngineConfig,
                   log: Log = print) -> dict:
    """Every system the run has trained so far, on the test split (per-system results are cached), and the
    policies of `cfg.transfer_from`."""
    llm_policies, knowledge_policies = discover_policies(run)
    llm_policies += transferred_policies(cfg)
    log(f"[evaluate] LLM re-rankers: {[p.name for p in llm_policies]}; knowledge from: "
        f"{[p.name for p in knowledge_policies]}; LLM systems on "
        f"{cfg.llm_users or 'all'} {cfg.eval.split} users")
    return evaluate_run(run, cfg, model_path, llm_policies, knowledge_policies, engine, log)


def evaluate_run(run: RunSpec, cfg: FinalEvalConfig, model_path: str, llm_policies: list[Policy],
                 knowledge_policies: list[Policy], engine: EngineConfig | None = None, log: Log = print) -> dict:
    """Score every system, write eval/metrics.{json,md} and eval/metrics.png; returns the summary."""
    from recalign.evaluation.report import plot_systems, write_report
    from recalign.recsys.stage import sasrec_scores

    data = Dataset(run.dir("data"))
    split = data.split(cfg.eval.split)
    names = cfg.eval.metrics
    all_rows = np.arange(len(split))
    sampled = sampled_users(run)
    sub = llm_rows(data, cfg.eval.split, cfg.llm_users, cfg.subset_seed, sampled)
    base_key = fingerprint({"data": fingerprint_of(run.dir("data")), "eval": to_dict(cfg.eval)})
    has_ka = io.exists(io.join(run.dir("reward_model", "ka"), "model.pt"))
    keys = llm_system_keys(run, cfg, model_path, sub, base_key, llm_policies, knowledge_policies if has_ka else None)
    results: dict[str, dict] = {}

    for name, scores in baseline_systems(data, split, cfg.eval.seed).items():
        results[name] = _cached(run, name, base_key, lambda s=scores: _metric_rows(s, split.target_index, all_rows,
                                                                                   names), log)
    sasrec_key = fingerprint([base_key, fingerprint_of(run.dir("baselines", "sasrec"))])
    sasrec_test = sasrec_scores(run, split)
    results["sasrec"] = _cached(run, "sasrec", sasrec_key, lambda: _metric_rows(
        sasrec_test, split.target_index, all_rows, names), log)

    if has_ka:
        results.update(_knowledge_systems(run, cfg, data, split, sub, model_path, knowledge_policies,
                                          engine or EngineConfig(), keys, log))
    prompt = run_rerank_prompt(run, cfg) if llm_policies else None
    for policy in llm_policies:
        results[policy.name] = _cached(run, policy.name, keys[policy.name], lambda p=policy: _llm_system(
            data, cfg, p.prompt or prompt, split, sub, model_path, p), log)
    fusion_note = ""
    if llm_policies and cfg.valid_users >= 0:
        validation = validate_rerankers(run, cfg, data, model_path, llm_policies, keys, prompt, sampled, log)
        partner, weight = validation["fusion"]["reranker"], validation["fusion"]["weight"]
        llm_test = np.asarray(results[partner]["scores"])
        results[FUSION] = _metric_rows(fuse(sasrec_test[sub], llm_test, weight), split.target_index[sub], sub, names)
        fusion_note = f"sasrec + {weight:g} x {partner}, chosen on {validation['rows']} validation users"
        log(f"[evaluate] {FUSION}: {fusion_note}")

    per_example = {n: {m: np.asarray(v) for m, v in r["metrics"].items()} for n, r in results.items()}
    rows = {n: np.asarray(r["rows"]) for n, r in results.items()}
    notes = {n: f"{len(rows[n])} of {len(split)} users, none sampled" for n in results if len(rows[n]) < len(split)}
    if fusion_note:
        notes[FUSION] = "; ".join(filter(None, [fusion_note, notes.get(FUSION, "")]))
    summary = summarise(per_example, cfg.eval, rows, notes)
    for n, r in results.items():
        if "free_generation" in r:
            summary["systems"][n]["free_generation"] = r["free_generation"]
    summary["llm_users"] = {"rows": int(len(sub)), "excluded_sampled_users": len(sampled)}
    summary["comparisons"] = compare_systems(per_example, rows, cfg.eval)
    table = write_report(summary, run.dir("eval"), f"Test-split results on {data.meta['name']}")
    plot_systems(summary, run.dir("eval", "metrics.png"))
    return {"table": table}


def llm_system_keys(run: RunSpec, cfg: FinalEvalConfig, model_path: str, sub: np.ndarray, base_key: str,
                    llm_policies: list[Policy], knowledge_policies: list[Policy] | None) -> dict[str, str]:
    """The cache key of every LLM-based system (and KA-SASRec's), by table name: a fingerprint of all its
    result depends on. Re-rankers: data, evaluation settings, the base model's files, the user subset, the
    adapter, the scorer and the re-rank prompt. Knowledge systems (knowledge_policies not None): the reward
    model, the same LLM inputs, the knowledge prompt, the generation settings and the encoder the reward
    model read its analyses through (a changed encoder would feed it vectors from another space)."""
    from recalign.reward.stage import encoder_of

    llm_key = fingerprint([base_key, model_fingerprint(model_path), sub.tolist()]) if model_path else base_key
    keys: dict[str, str] = {}
    if llm_policies:
        prompt = run_rerank_prompt(run, cfg)
        for policy in llm_policies:
            keys[policy.name] = fingerprint([llm_key, policy.key, cfg.rerank.key(), to_dict(policy.prompt or prompt),
                                             LLM_CACHE_FORMAT])
    if knowledge_policies is not None:
        ka_key = fingerprint([base_key, input_key(run.dir("reward_model"))])
        keys[NO_KNOWLEDGE] = ka_key
        encoder = encoder_of(run)
        gen = {"max_new_tokens": cfg.knowledge.max_new_tokens, "prompt": to_dict(knowledge_prompt(run)),
               "encoder": to_dict(encoder), "encoder_files": model_fingerprint(encoder.model_path)}
        for policy in knowledge_policies:
            keys[knowledge_system(policy)] = fingerprint([ka_key, llm_key, policy.key, gen])
    return keys


def knowledge_system(policy: Policy) -> str:
    return f"ka-sasrec + {policy.name} knowledge"


def _knowledge_systems(run, cfg, data, split, sub, model_path, policies, engine, keys, log) -> dict:
    from recalign.evaluation.knowledge import generate_analyses, knowledge_prompts, knowledge_vectors
    from recalign.recsys.ka_train import load_ka_model, score_with_knowledge
    from recalign.reward.stage import encoder_of

    ka = load_ka_model(run.dir("reward_model", "ka"))
    out = {NO_KNOWLEDGE: _cached(run, NO_KNOWLEDGE, keys[NO_KNOWLEDGE], lambda: _metric_rows(
        score_with_knowledge(ka, split.history, split.candidates, None, None), split.target_index,
        np.arange(len(split)), cfg.eval.metrics), log)}
    names = {p.name: knowledge_system(p) for p in policies}
    keys = {p.name: keys[names[p.name]] for p in policies}
    prompt = knowledge_prompt(run)
    encoder = encoder_of(run)  # the encoder the reward model read its analyses through
    todo = [p for p in policies if not _is_cached(run, names[p.name], keys[p.name])]
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if todo:  # every policy that lacks results, in one generation pass and one encoder pass
        users = split.user_idx[sub]
        log(f"[evaluate] knowledge: greedy analyses of {len(users)} users by {[p.name for p in todo]}")
        prompts = knowledge_prompts(run.dir("data"), cfg.eval.split, users, model_path, prompt)
        answers = generate_analyses(prompts, {p.name: p.adapter for p in todo}, model_path, engine,
                                    cfg.knowledge, log)
        vectors = knowledge_vectors(answers, users, data.num_users, run.dir("eval", "knowledge"), encoder)
    for policy in policies:
        def compute(p=policy) -> dict:
            scores = score_with_knowledge(ka, split.history[sub], split.candidates[sub], *vectors[p.name])
            return _metric_rows(scores, split.target_index[sub], sub, cfg.eval.metrics)

        out[names[policy.name]] = _cached(run, names[policy.name], keys[policy.name], compute, log)
    return out


def validate_rerankers(run: RunSpec, cfg: FinalEvalConfig, data: Dataset, model_path: str, llm_policies: list[Policy],
                       keys: dict[str, str], prompt: PromptConfig, sampled: set[int], log: Log = print) -> dict:
    """Every LLM re-ranker and SASRec on `cfg.valid_users` validation users (re-rankers cached by key), the best
    re-ranker by `cfg.fusion.metric` and fusion's weight for it; written to eval/validation.json and returned.
    Fusion's own validation metric is that of its chosen weight, so it is optimistic by construction."""
    from recalign.recsys.stage import sasrec_scores

    metric = cfg.fusion.metric
    valid = data.split("valid")
    vsub = llm_rows(data, "valid", cfg.valid_users, cfg.subset_seed, sampled)
    vkey = fingerprint(["valid", vsub.tolist()])
    sasrec = sasrec_scores(run, valid)[vsub]
    target = valid.target_index[vsub]
    systems = {"sasrec": _means(sasrec, target, cfg.eval.metrics)}
    llm_scores = {}
    for policy in llm_policies:
        result = _cached(run, f"valid {policy.name}", fingerprint([keys[policy.name], vkey]), lambda p=policy: (
            _llm_system(data, cfg, p.prompt or prompt, valid, vsub, model_path, p, split_name="valid")), log)
        llm_scores[policy.name] = np.asarray(result["scores"])
        systems[policy.name] = {m: float(np.mean(v)) for m, v in result["metrics"].items()}
    best = max(llm_scores, key=lambda n: (systems[n][metric], -list(llm_scores).index(n)))
    weight, grid = choose_weight(sasrec, llm_scores[best], target, cfg.fusion)
    systems[FUSION] = _means(fuse(sasrec, llm_scores[best], weight), target, cfg.eval.metrics)
    order = ["sasrec", *llm_scores, FUSION]  # ties go to the simpler system
    validation = {"split": "valid", "rows": int(len(vsub)), "metric": metric, "systems": systems,
                  "best": max(order, key=lambda n: (systems[n][metric], -order.index(n))),
                  "fusion": {"reranker": best, "weight": weight, "grid": {f"{w:g}": v for w, v in grid.items()}},
                  "note": "fusion's weight was chosen on these users: its validation metric is optimistic"}
    io.write_json(validation, run.dir("eval", "validation.json"))
    return validation


def _means(scores: np.ndarray, target: np.ndarray, names) -> dict[str, float]:
    return {m: float(v.mean()) for m, v in metrics.compute(scores, target, names).items()}


def _llm_system(data: Dataset, cfg: FinalEvalConfig, prompt: PromptConfig, split, sub: np.ndarray, model_path: str,
                policy: Policy, split_name: str = "") -> dict:
    """The re-ranker's metrics on rows `sub` of `split` (named `split_name`, default the evaluated split), its
    free-generation metrics and its letter logits per row (fusion reads them)."""
    loader = functools.partial(load_policy, model_path, policy.adapter, cfg.rerank.dtype)
    _, tokenizer = load_policy(model_path) if policy.adapter else loader()
    texts = build_prompts(data, split_name or cfg.eval.split, sub, tokenizer,
                          prompt_for(prompt, has_projector(policy.adapter)))
    logits, answers = score_rows_with_ray(dict(zip(sub.tolist(), texts)), loader, split.candidates.shape[1], cfg.rerank)
    scores = np.stack([logits[r] for r in sub.tolist()])
    result = _metric_rows(scores, split.target_index[sub], sub, cfg.eval.metrics)
    result["scores"] = scores.tolist()
    result["free_generation"] = free_generation_metrics([answers[r] for r in sub.tolist()], split.target_index[sub],
                                                        split.candidates.shape[1])
    return result
