"""The sample stage: N preference analyses per user under `<run>/samples/` (see `recalign.sampling.pipeline`),
and how later stages read them back: the samples themselves and the knowledge prompt they were written for."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from recalign import io
from recalign.config import fingerprint
from recalign.prompts import PromptConfig
from recalign.runs import Log, RunSpec, fingerprint_of, run_stage
from recalign.sampling.actors import read_samples
from recalign.sampling.config import SampleConfig
from recalign.sampling.pipeline import generation_key, run_sampling

SAMPLE_COLUMNS = ("user_idx", "split", "sample_idx", "prompt", "response")


def sample_stage(run: RunSpec, cfg: SampleConfig, log: Log = print, force: bool = False) -> dict:
    """`samples/` of a run, skipped when finished for the same users and generation settings.

    Engine and actor settings are not part of the key: they change how fast samples come, not which.
    A changed generation setting fails in `run_sampling` unless `overwrite` is set (samples are costly).
    """
    key = fingerprint({**generation_key(cfg, fingerprint_of(run.dir("data"))), "num_users": cfg.num_users,
                       "subset_seed": cfg.subset_seed})
    return run_stage("sample", run.dir("samples"), key,
                     lambda: run_sampling(cfg, run.dir("data"), run.dir("samples"), log=log), log, force)


def load_samples(samples_dir: str, split: str = "train") -> pa.Table:
    """The sampling stage's rows for `split` prompts, sorted by (user, sample); every user has the same N.

    Rewards and pairs read the `train` prompts only, so no validation or test history reaches them."""
    if not io.exists(io.join(samples_dir, "meta.json")):
        raise FileNotFoundError(f"{samples_dir}: no meta.json; the sampling stage has not finished (jobs/sample.py)")
    table = read_samples(samples_dir)
    missing = [c for c in SAMPLE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{samples_dir}: samples table lacks column(s) {missing}")
    table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        raise ValueError(f"{samples_dir}: no samples for {split!r} prompts")
    frame = table.select(["user_idx", "sample_idx"]).to_pandas()
    if frame.duplicated().any():
        row = frame[frame.duplicated()].iloc[0]
        raise ValueError(f"{samples_dir}: duplicate sample user_idx={row.user_idx} sample_idx={row.sample_idx}")
    per_user = frame.groupby("user_idx").size()
    if per_user.nunique() != 1:
        raise ValueError(f"{samples_dir}: users have different sample counts ({per_user.min()}..{per_user.max()}); "
                         "the sampling stage writes exactly N per user")
    return table.sort_by([("user_idx", "ascending"), ("sample_idx", "ascending")])


def knowledge_prompt(run: RunSpec) -> PromptConfig:
    """The knowledge prompt the run's analyses were sampled with (samples/config.json): what the knowledge
    policies were rewarded and aligned on, and so what evaluation must prompt them with."""
    uri = run.dir("samples", "config.json")
    if not io.exists(uri):
        raise FileNotFoundError(f"{uri}: missing; run the sample stage first (it fixes the knowledge prompt)")
    return PromptConfig(**io.read_json(uri)["key"]["prompt"])
