"""Leakage guard, and the reward job end to end on a tiny dataset.

Every user's last interaction (the test target) is one shared item titled SENTINEL TEST ITEM, and the
second to last (the validation target) SENTINEL VALID ITEM. Everyone has seen them, so they are nobody's
negative candidate: a test item can reach the reward model, the rewards or the pairs only by leaking.
The samples table also carries analyses of *test* prompts that mention the sentinel; they must be ignored.
"""

from __future__ import annotations

import glob
import os
import uuid

import numpy as np
import pyarrow as pa
import pytest

from recalign import io
from recalign.data.dataset import Dataset
from recalign.prompts import LETTERS
from recalign.runs import RunSpec

pytestmark = pytest.mark.ray

SMALL = ["model.hidden_size=16", "model.num_layers=1", "model.max_len=8", "ka.adaptor_hidden=8",
         "train.epochs=2", "train.train_batch_size=16", "train.learning_rate=0.005", "train.num_workers=2",
         "compare.num_resamples=100", "encoder.batch_size=16", "pairs.num_negatives=2", "pairs.margin=0.0"]


@pytest.fixture(scope="module")
def sentinel_run(tmp_path_factory, ray_local, tiny_llama_dir):
    """A run dir with sentinel data, train + test samples, a SASRec baseline; then the whole reward job."""
    import reward as reward_job

    from recalign.recsys.sasrec import SASRec, SASRecConfig
    from recalign.recsys.train import SASRecJobSpec, save_model
    from tests.helpers.data import SENTINEL_TEST, make_tiny_dataset
    from tests.helpers.reward import make_samples, save_tiny_bert, write_samples

    root = tmp_path_factory.mktemp("leak")
    data_dir = make_tiny_dataset(root, sentinels=True)
    run = RunSpec("tiny", str(root / "runs"))
    assert data_dir == run.dir("data")
    data = Dataset(data_dir)
    train_samples = make_samples(data, num_samples=3)
    cutoff_samples = make_samples(data, num_samples=2, splits=("cutoff",))
    test_samples = make_samples(data, num_samples=3, splits=("test",))
    test_samples = test_samples.set_column(test_samples.schema.get_field_index("response"), "response",
                                           pa.array([f"the user will watch {SENTINEL_TEST}"] * test_samples.num_rows))
    write_samples(pa.concat_tables([train_samples, cutoff_samples, test_samples]), run.dir("samples"))
    sasrec_cfg = SASRecConfig(hidden_size=16, num_layers=1, max_len=8)
    save_model(SASRec(data.num_items, sasrec_cfg).state_dict(), SASRecJobSpec(data_dir, sasrec_cfg),
               run.dir("baselines", "sasrec"), {"note": "random init, test baseline"})

    bert = save_tiny_bert(root / "bert")
    argv = [f"run.root={root / 'runs'}", "run.name=tiny", f"encoder.model_path={bert}",
            f"pairs.model={tiny_llama_dir}", *SMALL]
    summaries = reward_job.main(argv)
    return run, data, summaries, train_samples


def _sentinels(data: Dataset) -> tuple[int, int]:
    from tests.helpers.data import SENTINEL_TEST, SENTINEL_VALID

    titles = data.items["title"]
    test_item = int(titles.index[titles == SENTINEL_TEST][0])
    valid_item = int(titles.index[titles == SENTINEL_VALID][0])
    assert set(data.split("test").target.tolist()) == {test_item}  # the dataset is built as intended
    assert set(data.split("valid").target.tolist()) == {valid_item}
    return test_item, valid_item


def test_reward_job_writes_every_output(sentinel_run):
    run, data, summaries, train_samples = sentinel_run
    for path in [("embeddings", "train.parquet"), ("embeddings", "cutoff.parquet"), ("embeddings", "config.json"),
                 ("reward_model", "ka", "model.pt"),
                 ("reward_model", "plain", "model.pt"), ("reward_model", "comparison.json"),
                 ("reward_model", "comparison.md"), ("rewards", "rewards.parquet"), ("rewards", "summary.json"),
                 ("pairs", "knowledge.parquet"), ("pairs", "rerank.parquet"), ("pairs", "summary.json")]:
        assert io.exists(run.dir(*path)), path
    comparison = io.read_json(run.dir("reward_model", "comparison.json"))
    assert set(comparison["systems"]) == {"ka_sasrec", "ka_sasrec_per_sample", "ka_sasrec_shuffled",
                                          "ka_sasrec_no_knowledge", "plain_sasrec", "sasrec_baseline"}
    assert comparison["reference"] == "plain_sasrec"
    for key in ("train/train", "valid/train", "train/cutoff"):  # own vs shuffled vs none, held-out targets
        gain = comparison["gain"][key]
        assert gain["num_users"] == data.num_users and {"own_vs_none", "shuffled_vs_none", "own_vs_shuffled"} <= set(
            gain["logp"])
    assert "own vs shuffled" in io.read_text(run.dir("reward_model", "comparison.md"))
    assert summaries["rewards"]["num_rows"] == train_samples.num_rows
    pairs = summaries["pairs"]
    assert pairs["rerank"]["kept"] == data.num_users
    assert pairs["knowledge"]["kept"] + pairs["knowledge"]["dropped_margin"] + \
        pairs["knowledge"]["dropped_duplicate_text"] == data.num_users
    assert io.read_parquet(run.dir("pairs", "knowledge.parquet")).num_rows == pairs["knowledge"]["kept"]


def test_no_test_item_reaches_embeddings_rewards_or_pairs(sentinel_run):
    run, data, _, train_samples = sentinel_run
    test_item, valid_item = _sentinels(data)
    embeddings = io.read_parquet(run.dir("embeddings", "train.parquet"))
    assert embeddings.num_rows == train_samples.num_rows  # the test-prompt analyses were never embedded
    assert not io.exists(run.dir("embeddings", "test.parquet"))

    rewards = io.read_parquet(run.dir("rewards", "rewards.parquet")).to_pandas()
    assert not {test_item, valid_item} & set(rewards["target"])
    last_train = {u: int(s[-1]) for u, s in enumerate(data.train_sequences())}
    assert all(rewards["target"] == rewards["user_idx"].map(last_train))

    for path in ("knowledge", "rerank"):
        table = io.read_parquet(run.dir("pairs", f"{path}.parquet"))
        text = " ".join(table["prompt"].to_pylist() + table["chosen"].to_pylist()
                        + [r for rs in table["rejected"].to_pylist() for r in rs]).lower()
        assert "sentinel" not in text, path


def test_hard_negatives_are_sasrecs_top_scored_non_targets(sentinel_run):
    from recalign.recsys.train import load_model, score_split

    run, data, _, _ = sentinel_run
    split = data.split("train")
    scores = score_split(load_model(run.dir("baselines", "sasrec")), split.history, split.candidates)
    table = io.read_parquet(run.dir("pairs", "rerank.parquet")).to_pylist()
    for i, row in enumerate(table):
        target = int(split.target_index[i])
        expected = sorted((c for c in range(split.candidates.shape[1]) if c != target), key=lambda c: -scores[i, c])
        assert [r[0] for r in row["rejected"]] == [LETTERS[c] for c in expected[:2]]
        assert row["chosen"][0] == LETTERS[target]


def test_ka_training_batches_never_contain_test_or_valid_items(sentinel_run, tmp_path):
    from recalign.recsys.ka_sasrec import KAConfig
    from recalign.recsys.ka_train import KAJobSpec, fit_ka, knowledge_windows
    from recalign.recsys.sasrec import SASRecConfig
    from recalign.recsys.train import SeqTrainConfig

    run, data, _, _ = sentinel_run
    test_item, valid_item = _sentinels(data)
    probe_dir = str(tmp_path / "probe")
    os.makedirs(probe_dir)

    def probe(inputs, targets, owners, present):  # runs inside the Ray Train workers
        np.savez(os.path.join(probe_dir, f"{uuid.uuid4().hex}.npz"), inputs=inputs.cpu().numpy(),
                 targets=targets.cpu().numpy(), owners=owners.cpu().numpy(), present=present.cpu().numpy())

    spec = KAJobSpec(run.dir("data"), run.dir("embeddings"),
                     SASRecConfig(hidden_size=16, num_layers=1, max_len=8), KAConfig(adaptor_hidden=8),
                     SeqTrainConfig(epochs=1, train_batch_size=16, num_workers=2))
    fit_ka(spec, str(tmp_path / "ka"), str(tmp_path / "ray"), "probe", on_batch=probe)
    batches = [np.load(f) for f in glob.glob(os.path.join(probe_dir, "*.npz"))]
    assert batches
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    owners = np.concatenate([b["owners"] for b in batches])
    seen = set(inputs.ravel().tolist()) | set(targets.ravel().tolist())
    assert test_item not in seen and valid_item not in seen
    # Each user's reward target (last train item) is held out of that user's windows too.
    for user, seq in enumerate(data.train_sequences()):
        mine = owners == user
        assert mine.any() and not (inputs[mine] == seq[-1]).any() and not (targets[mine] == seq[-1]).any()
    # One epoch over both workers covers every window once (DistributedSampler may repeat one to even out).
    num_windows = len(knowledge_windows(data.train_sequences(), 8)[0])
    assert num_windows <= len(owners) <= num_windows + 1
    # Knowledge only where it is known: a position reads the cutoff analysis only if its target lies at or after
    # the cut-off, so never one of the items the analysis's prompt listed (the cutoff example's history).
    present = np.concatenate([b["present"] for b in batches])
    assert present.any(), "the cutoff analyses were read somewhere"
    cutoff = data.split("cutoff")
    listed = {int(u): set(h[h > 0].tolist()) for u, h in zip(cutoff.user_idx, cutoff.history)}
    first_after = {int(u): int(t) for u, t in zip(cutoff.user_idx, cutoff.target)}
    sequences = data.train_sequences()
    for w in range(len(owners)):
        user = int(owners[w])
        read = targets[w][present[w]]
        assert not set(read.tolist()) & listed[user], f"user {user} read its analysis predicting an item it lists"
        if len(read):
            seq = list(sequences[user])
            assert min(seq.index(int(t)) for t in read) >= seq.index(first_after[user])
