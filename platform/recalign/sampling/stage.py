"""The sample stage: preference analyses under `<run>/samples/<split>/` (see `recalign.sampling.pipeline`), and
how later stages read them back: the samples themselves and the knowledge prompt they were written for.

Two sets, written with the same model, prompt and sampling settings:
- `samples/train/`: N analyses per user of the `train` example's history. They are rewarded on the train
  target and become the preference pairs.
- `samples/cutoff/`: analyses of the `cutoff` example's history (an earlier point of the same sequence).
  The reward model learns to read analyses on the items after that cut-off, so the analyses it scores
  were never fused into a prediction of anything they describe.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from recalign import io
from recalign.config import fingerprint
from recalign.data.loaders import DataError
from recalign.errors import MissingInputError
from recalign.prompts import PromptConfig
from recalign.runs import Log, RunSpec, fingerprint_of, run_stage
from recalign.sampling.actors import read_samples
from recalign.sampling.config import SampleConfig
from recalign.sampling.pipeline import generation_key, run_sampling

SAMPLE_COLUMNS = ("user_idx", "split", "sample_idx", "prompt", "response")


def sample_sets(cfg: SampleConfig) -> dict[str, SampleConfig]:
    """{split: the config that samples it}: the rewarded set, and the cutoff set when cutoff_samples > 0."""
    sets = {cfg.split: dataclasses.replace(cfg, cutoff_samples=0)}
    if cfg.cutoff_samples:
        sets["cutoff"] = dataclasses.replace(cfg, split="cutoff", num_users=cfg.cutoff_users or cfg.num_users,
                                             num_samples=cfg.cutoff_samples, cutoff_samples=0)
    return sets


def sample_stage(run: RunSpec, cfg: SampleConfig, log: Log = print, force: bool = False) -> dict:
    """`samples/<split>/` of a run for each set, skipped when finished for the same users and settings.

    Engine and actor settings are not part of the key: they change how fast samples come, not which.
    A changed generation setting fails in `run_sampling` unless `overwrite` is set (samples are costly).
    """
    data_key = fingerprint_of(run.dir("data"))
    sets = sample_sets(cfg)
    key = fingerprint({split: {**generation_key(c, data_key), "num_users": c.num_users, "subset_seed": c.subset_seed}
                       for split, c in sets.items()})

    def build() -> dict:
        return {split: run_sampling(c, run.dir("data"), run.dir("samples", split), log=log) for split, c in sets.items()}

    return run_stage("sample", run.dir("samples"), key, build, log, force)


def load_samples(samples_dir: str, split: str = "train") -> pa.Table:
    """The sampling stage's rows for `split` prompts (`samples_dir/<split>/`), sorted by (user, sample); every
    user has the same N. Rewards and pairs read the `train` prompts only, so no validation or test history
    reaches them; the reward model also reads the `cutoff` prompts."""
    set_dir = io.join(samples_dir, split)
    if not io.exists(io.join(set_dir, "meta.json")):
        raise MissingInputError(f"{set_dir}: no meta.json; the sampling stage has not finished for {split!r} "
                                "prompts (jobs/sample.py)")
    table = read_samples(set_dir)
    missing = [c for c in SAMPLE_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{samples_dir}: samples table lacks column(s) {missing}")
    table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        raise DataError(f"{samples_dir}: no samples for {split!r} prompts")
    frame = table.select(["user_idx", "sample_idx"]).to_pandas()
    if frame.duplicated().any():
        row = frame[frame.duplicated()].iloc[0]
        raise DataError(f"{samples_dir}: duplicate sample user_idx={row.user_idx} sample_idx={row.sample_idx}")
    per_user = frame.groupby("user_idx").size()
    if per_user.nunique() != 1:
        raise DataError(f"{samples_dir}: users have different sample counts ({per_user.min()}..{per_user.max()}); "
                         "the sampling stage writes exactly N per user")
    return table.sort_by([("user_idx", "ascending"), ("sample_idx", "ascending")])


def sampled_users(run: RunSpec) -> set[int]:
    """The users any sample set of the run holds (empty without samples): their analyses trained something."""
    users: set[int] = set()
    for split in ("train", "cutoff"):
        set_dir = run.dir("samples", split)
        if io.exists(io.join(set_dir, "meta.json")):
            users.update(read_samples(set_dir)["user_idx"].to_pylist())
    return users


def knowledge_prompt(run: RunSpec) -> PromptConfig:
    """The knowledge prompt the run's analyses were sampled with (samples/config.json): what the knowledge
    policies were rewarded and aligned on, and so what evaluation must prompt them with."""
    uri = run.dir("samples", "train", "config.json")
    if not io.exists(uri):
        raise MissingInputError(f"{uri}: missing; run the sample stage first (it fixes the knowledge prompt)")
    return PromptConfig(**io.read_json(uri)["key"]["prompt"])
